/*
 * floodgen: the flood generator and the C recvmmsg drain reference of bench/flood.
 *
 *   floodgen send --mode MODE --src A.B.C.D --dst A.B.C.D --port P --seconds S
 *                 [--ports N] [--sources N [--fresh A.B.C.D]] [--user HEX] [--resource HEX]
 *                 [--knock HEX112]
 *   floodgen drain --port P --seconds S
 *
 * send: IPv4 datagrams, 64 per sendmmsg call, for S seconds, from source address --src
 * (an address of the sending namespace) and source port 20000; with --ports N > 1 from
 * ports 20000 .. 20000+N-1 in turn, through a raw socket (IP_HDRINCL) that sets any
 * source port without binding N sockets; with --sources N > 1 (raw socket too) from the
 * addresses --src, --src + 1, ... --src + N - 1 (spoofed: the benchmark routes their
 * replies back into the sending namespace, which drops them); adding --fresh F (pre-filter
 * fill): the first N datagrams from the N sources (one each), then every other datagram
 * from F (a fresh flooding source) while the rest keep cycling. Payloads come from a pool of
 * 4096 pre-built ones, so the generator spends its time sending. Modes:
 *   junk       56 random bytes (wrong magic)
 *   wrongsize  100 random bytes
 *   forged     a KNOCK for a known --user/--resource with a random SALT and AUTH (bad MAC)
 *   replay     the captured valid KNOCK --knock (112 hex digits), identical every time
 *   response   a RESPONSE for a known --user/--resource with a random SALT and AUTH (a
 *              forged answer to a CHALLENGE nobody got)
 * Prints "sent=N seconds=T rate=R errors=E cpu=C" on stdout (C: its own user + system CPU
 * seconds, getrusage: with a veth that includes the receiving side's softirq work).
 *
 * drain: a dual-stack UDP socket on --port drained with recvmmsg (64 per call, blocking
 * for the first): the receive capacity reference. Prints "received=N seconds=T".
 * With --pause-us U it rests about as fastknockd's batched reader does (knockd/_recv.pyx,
 * "The rest"): a call that returned less than a full batch within 1 ms of the previous
 * one is followed by a sleep of U microseconds: the like-for-like reference.
 *
 * Only ever run inside the benchmark's own network namespaces (bench/flood/run.py).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define POOL 4096
#define MAXPAY 128
#define HDR 28 /* IPv4 (20) + UDP (8) */
#define MAGIC 0x3B1BB719u

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void usage(void) {
    fprintf(stderr, "usage: floodgen send --mode junk|wrongsize|forged|replay|response --src A "
                    "--dst A --port P --seconds S [--ports N] [--sources N [--fresh A]] [--user HEX] "
                    "[--resource HEX] "
                    "[--knock HEX]\n       floodgen drain --port P --seconds S [--pause-us U]\n");
    exit(2);
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint8_t rnd8(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint8_t)(rng >> 24);
}

static void be32(uint8_t *p, uint32_t v) {
    p[0] = v >> 24;
    p[1] = v >> 16;
    p[2] = v >> 8;
    p[3] = v;
}

static int unhex(const char *s, uint8_t *out, size_t n) {
    if (strlen(s) != 2 * n) return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1) return -1;
        out[i] = (uint8_t)v;
    }
    return 0;
}

static int do_send(int argc, char **argv) {
    const char *mode = NULL, *src = NULL, *dst = NULL, *knock = NULL, *fresh = NULL;
    int port = 0, nports = 1, nsources = 1;
    double seconds = 0;
    uint32_t user = 1, resource = 0x22;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--mode")) mode = argv[i + 1];
        else if (!strcmp(argv[i], "--src")) src = argv[i + 1];
        else if (!strcmp(argv[i], "--dst")) dst = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--ports")) nports = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--sources")) nsources = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--fresh")) fresh = argv[i + 1];
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--user")) user = (uint32_t)strtoul(argv[i + 1], NULL, 16);
        else if (!strcmp(argv[i], "--resource")) resource = (uint32_t)strtoul(argv[i + 1], NULL, 16);
        else if (!strcmp(argv[i], "--knock")) knock = argv[i + 1];
        else usage();
    }
    if (!mode || !src || !dst || port <= 0 || port > 65535 || seconds <= 0 || nports < 1 ||
        nports > 40000 || nsources < 1 || nsources > 1000000)
        usage();
    struct in_addr sa, da;
    if (inet_pton(AF_INET, src, &sa) != 1 || inet_pton(AF_INET, dst, &da) != 1) usage();
    struct in_addr fa = {0};
    if (fresh && (nsources < 2 || inet_pton(AF_INET, fresh, &fa) != 1)) usage();

    size_t paylen = 56;
    uint8_t knockbytes[56];
    if (!strcmp(mode, "wrongsize")) paylen = 100;
    else if (!strcmp(mode, "replay")) {
        if (!knock || unhex(knock, knockbytes, 56)) usage();
    } else if (strcmp(mode, "junk") && strcmp(mode, "forged") && strcmp(mode, "response"))
        usage();

    static uint8_t pool[POOL][HDR + MAXPAY];
    size_t len = HDR + paylen;
    for (int k = 0; k < POOL; k++) {
        uint8_t *p = pool[k], *pay = p + HDR;
        memset(p, 0, HDR);
        p[0] = 0x45;                   /* IPv4, 20-byte header */
        p[8] = 64;                     /* TTL */
        p[9] = IPPROTO_UDP;            /* total length, id, checksum: filled by the kernel */
        memcpy(p + 12, &sa, 4);
        memcpy(p + 16, &da, 4);
        p[22] = port >> 8;             /* UDP destination port */
        p[23] = port & 0xFF;
        p[24] = (8 + paylen) >> 8;     /* UDP length; checksum 0: none (IPv4) */
        p[25] = (8 + paylen) & 0xFF;
        for (size_t j = 0; j < paylen; j++) pay[j] = rnd8();
        if (!strcmp(mode, "forged") || !strcmp(mode, "response")) {
            be32(pay, MAGIC);
            be32(pay + 4, strcmp(mode, "forged") ? 2 : 0); /* RESPONSE or KNOCK */
            be32(pay + 8, user);
            be32(pay + 12, resource);
        } else if (!strcmp(mode, "replay")) {
            memcpy(pay, knockbytes, 56);
        } else if (!strcmp(mode, "junk") && pay[0] == 0x3B) {
            pay[0] ^= 0xFF; /* never the magic */
        }
    }

    /* One source port: a connected UDP socket (the kernel's fastest send path). Many
     * source ports: a raw socket, patching the UDP source port of each datagram. */
    int raw = nports > 1 || nsources > 1;
    int fd = raw ? socket(AF_INET, SOCK_RAW, IPPROTO_RAW) : socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    int sndbuf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf));
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr = da};
    size_t off = raw ? 0 : HDR;
    if (!raw) {
        struct sockaddr_in me = {.sin_family = AF_INET, .sin_addr = sa, .sin_port = htons(20000)};
        to.sin_port = htons(port);
        if (bind(fd, (struct sockaddr *)&me, sizeof(me))) die("bind");
        if (connect(fd, (struct sockaddr *)&to, sizeof(to))) die("connect");
    }
    static uint8_t slots[BATCH][HDR + MAXPAY];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = slots[i] + off;
        iov[i].iov_len = len - off;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = raw ? &to : NULL;
        msgs[i].msg_hdr.msg_namelen = raw ? sizeof(to) : 0;
    }
    unsigned long long sent = 0, errors = 0;
    unsigned k = 0, pi = 0, si = 0;
    uint32_t base = ntohl(sa.s_addr);
    double start = now(), end = start + seconds, t = start;
    while (t < end) {
        for (int i = 0; i < BATCH; i++) {
            memcpy(slots[i], pool[k++ % POOL], len);
            unsigned sport = 20000 + (pi++ % (unsigned)nports);
            slots[i][20] = sport >> 8;
            slots[i][21] = sport & 0xFF;
            if (fresh && si >= (unsigned)nsources && ((sent + i) & 1)) {
                memcpy(slots[i] + 12, &fa, 4); /* the fresh flooding source */
            } else if (nsources > 1) {
                uint32_t a = htonl(base + si++ % (unsigned)nsources);
                memcpy(slots[i] + 12, &a, 4);
            }
        }
        int n = sendmmsg(fd, msgs, BATCH, 0);
        if (n > 0) sent += n;
        else if (errno != EINTR) errors++;
        t = now();
    }
    double took = now() - start;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("sent=%llu seconds=%.3f rate=%.0f errors=%llu cpu=%.6f\n", sent, took, sent / took,
           errors, ru.ru_utime.tv_sec + ru.ru_stime.tv_sec
                       + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
    return 0;
}

static int do_drain(int argc, char **argv) {
    int port = 0;
    double seconds = 0;
    long pause_us = 0;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--pause-us")) pause_us = atol(argv[i + 1]);
        else usage();
    }
    if (port <= 0 || port > 65535 || seconds <= 0 || pause_us < 0 || pause_us > 1000000) usage();
    int fd = socket(AF_INET6, SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    int off = 0;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off));
    int rcvbuf = 4 << 20; /* as fastknockd's control socket */
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    struct timeval tv = {.tv_sec = 0, .tv_usec = 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    struct sockaddr_in6 me = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    if (bind(fd, (struct sockaddr *)&me, sizeof(me))) die("bind");
    printf("ready\n");
    fflush(stdout);
    static uint8_t bufs[BATCH][64];
    struct sockaddr_in6 names[BATCH];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    unsigned long long got = 0;
    double start = now(), end = start + seconds, last = 0;
    struct timespec rest = {.tv_sec = 0, .tv_nsec = pause_us * 1000};
    while (now() < end) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = sizeof(bufs[i]);
            memset(&msgs[i].msg_hdr, 0, sizeof(msgs[i].msg_hdr));
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &names[i];
            msgs[i].msg_hdr.msg_namelen = sizeof(names[i]);
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n > 0) got += n;
        if (pause_us && n > 0) {
            double t = now();
            if (n < BATCH && t - last < 0.001) nanosleep(&rest, NULL);
            last = t;
        }
    }
    printf("received=%llu seconds=%.3f\n", got, now() - start);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    if (!strcmp(argv[1], "send")) return do_send(argc, argv);
    if (!strcmp(argv[1], "drain")) return do_drain(argc, argv);
    usage();
    return 2;
}
