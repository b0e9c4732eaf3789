// Loopback TCP load for the benchmarks, in C so that the generator is not the bottleneck.
//   loadgen churn PORT CLIENTS SERVERS RATE SECONDS: connect, write 64 bytes, close, paced at
//       RATE connections/s in total (0: as fast as possible); servers accept, read to EOF, close
//   loadgen rr PORT CLIENTS SECONDS SIZE: one connection per client, SIZE-byte request and
//       response round trips in a loop
// Prints "<completed> <elapsed seconds>" on stdout. Every loop ends at its deadline.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_in addr_of(int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static int listener(int port)
{
    int one = 1, s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = addr_of(port);
    struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    setsockopt(s, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));  // accept() wakes to see the time
    if (bind(s, (struct sockaddr *)&a, sizeof(a)) || listen(s, 4096)) {
        perror("listen");
        exit(2);
    }
    return s;
}

static int connect_to(int port)
{
    struct sockaddr_in a = addr_of(port);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&a, sizeof(a))) {
        close(s);
        return -1;
    }
    return s;
}

static int full(int fd, char *buf, int n, int rx)
{
    for (int done = 0; done < n;) {
        int k = rx ? read(fd, buf + done, n - done) : write(fd, buf + done, n - done);
        if (k <= 0)
            return -1;
        done += k;
    }
    return 0;
}

// children report their count through a pipe; the parent sums
static long gather(int fd, int n)
{
    long total = 0, v;
    for (int i = 0; i < n; i++)
        if (read(fd, &v, sizeof(v)) == sizeof(v))
            total += v;
    return total;
}

static void churn_server(int s, double deadline)
{
    char buf[4096];
    while (now() < deadline) {
        int c = accept(s, 0, 0);
        if (c < 0)
            continue;
        while (read(c, buf, sizeof(buf)) > 0)
            ;
        close(c);
    }
    _exit(0);
}

static long churn_client(int port, double rate, double start, double deadline)
{
    char msg[64];
    long n = 0;
    memset(msg, 'x', sizeof(msg));
    for (double t = now(); t < deadline; t = now()) {
        if (rate > 0 && n >= (t - start) * rate) {
            usleep(500);
            continue;
        }
        int c = connect_to(port);
        if (c < 0)
            continue;
        if (write(c, msg, sizeof(msg)) == sizeof(msg))
            n++;
        close(c);
    }
    return n;
}

static long rr_client(int port, int size, double deadline)
{
    char *buf = calloc(1, size);
    long n = 0;
    int one = 1, c = connect_to(port);
    if (c < 0)
        return 0;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    while (now() < deadline && full(c, buf, size, 0) == 0 && full(c, buf, size, 1) == 0)
        n++;
    close(c);
    return n;
}

static void rr_server(int s, int size, double deadline)
{
    char *buf = calloc(1, size);
    int one = 1;
    while (now() < deadline) {
        int c = accept(s, 0, 0);
        if (c < 0)
            continue;
        if (fork() == 0) {
            setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            while (full(c, buf, size, 1) == 0 && full(c, buf, size, 0) == 0)
                ;
            _exit(0);
        }
        close(c);
    }
    while (wait(0) > 0)
        ;
    _exit(0);
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: loadgen churn PORT CLIENTS SERVERS RATE SECONDS | "
                        "rr PORT CLIENTS SECONDS SIZE\n");
        return 2;
    }
    int churn = !strcmp(argv[1], "churn"), port = atoi(argv[2]), clients = atoi(argv[3]);
    int servers = churn ? atoi(argv[4]) : 1;
    double rate = churn ? atof(argv[5]) : 0, secs = atof(argv[churn ? 6 : 4]);
    int size = churn ? 64 : atoi(argv[5]);
    int pfd[2];
    pid_t srv[64];
    signal(SIGPIPE, SIG_IGN);
    if (pipe(pfd))
        return 2;
    double start = now() + 0.2, deadline = start + secs;
    for (int i = 0; i < servers && i < 64; i++) {
        int s = listener(port);
        if ((srv[i] = fork()) == 0) {
            if (churn)
                churn_server(s, deadline + 30);
            rr_server(s, size, deadline + 30);
        }
        close(s);
    }
    for (int i = 0; i < clients; i++) {
        if (fork() == 0) {
            while (now() < start)
                usleep(1000);
            long n = churn ? churn_client(port, rate / clients, start, deadline)
                           : rr_client(port, size, deadline);
            if (write(pfd[1], &n, sizeof(n)) != sizeof(n))
                _exit(1);
            _exit(0);
        }
    }
    long total = gather(pfd[0], clients);
    double elapsed = now() - start;
    usleep(500000);  // servers finish reading what is queued
    for (int i = 0; i < servers; i++)
        kill(srv[i], SIGTERM);
    while (wait(0) > 0)
        ;
    printf("%ld %.3f\n", total, elapsed);
    return 0;
}
