/* bench WebSocket load generator (single-threaded, epoll).
 *
 * echo mode (default): open -c connections, then each one sends a binary message of -s bytes
 *   (fresh random mask and fresh content per message), waits for the echo, checks it byte for
 *   byte, records the round trip, and repeats until -d seconds or -n messages in total.
 * idle mode (-m idle): open -c connections (at most -r handshakes in flight), print a
 *   "ready" JSON line, keep them idle until a line arrives on stdin (or -H seconds pass),
 *   then send one message on every connection and check every echo.
 * The result is one JSON line on stdout, prefixed "WSJSON ".
 *
 * usage: wsload -p PORT [-a 127.0.0.1] [-u /ws] [-c 64] [-s 64] [-d 5] [-n 0]
 *               [-m echo|idle] [-r 256] [-H 600] [-T 60]
 */
#include "common.h"

enum { S_CONNECTING, S_HANDSHAKE, S_OPEN, S_WAIT, S_DEAD };

typedef struct {
    int fd, state, id;
    buf_t in, out;
    const uint8_t *expect;   /* expected echo payload (points into the pool) */
    uint64_t t_sent;
    char accept[32];
} conn_t;

static const char *host = "127.0.0.1", *path = "/ws", *mode = "echo";
static int port, nconns = 64, size = 64, ramp = 256;
static double duration = 5.0, hold = 600.0, connect_timeout = 60.0;
static long maxmsgs = 0;

static int ep;
static conn_t *conns;
static uint8_t *pool;
static size_t pool_len;
static uint64_t rng = 0x9E3779B97F4A7C15ull;

#define HIST_MAX 2000000u  /* 1 us buckets up to 2 s */
static uint32_t *hist;
static uint64_t hist_n, lat_max;

static long n_msgs, n_mismatch, n_closed, n_connect_fail, n_handshake_fail, n_open, n_pending;
static long n_sent;
static int sending = 1;

static uint64_t xr(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}

static void record(uint64_t us) {
    hist[us < HIST_MAX ? us : HIST_MAX - 1]++;
    hist_n++;
    if (us > lat_max) lat_max = us;
}

static uint64_t pct(double p) {
    if (!hist_n) return 0;
    uint64_t want = (uint64_t)(p / 100.0 * (double)hist_n);
    if (want >= hist_n) want = hist_n - 1;
    uint64_t acc = 0;
    for (uint32_t i = 0; i < HIST_MAX; i++) {
        acc += hist[i];
        if (acc > want) return i;
    }
    return HIST_MAX;
}

static void ep_set(conn_t *c, uint32_t ev) {
    struct epoll_event e = {.events = ev, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
}

static void kill_conn(conn_t *c, long *counter) {
    if (c->state == S_DEAD) return;
    if (c->state == S_WAIT) n_pending--;
    if (c->state == S_OPEN || c->state == S_WAIT) n_open--;
    if (counter) (*counter)++;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = S_DEAD;
}

static int flush(conn_t *c) {
    while (buf_avail(&c->out)) {
        ssize_t n = send(c->fd, buf_data(&c->out), buf_avail(&c->out), MSG_NOSIGNAL);
        if (n > 0) { buf_consume(&c->out, (size_t)n); continue; }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n < 0 && errno == EINTR) continue;
        return -1;
    }
    ep_set(c, buf_avail(&c->out) ? (EPOLLIN | EPOLLOUT) : EPOLLIN);
    return 0;
}

static void start_connect(conn_t *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) { c->state = S_DEAD; n_connect_fail++; return; }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    c->state = S_CONNECTING;
    struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS)
        kill_conn(c, &n_connect_fail);
}

static void send_handshake(conn_t *c) {
    uint8_t key[16];
    for (int i = 0; i < 16; i += 8) { uint64_t r = xr(); memcpy(key + i, &r, 8); }
    char k64[32], req[512];
    base64(key, 16, k64);
    ws_accept(k64, c->accept);
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     path, host, port, k64);
    buf_put(&c->out, req, (size_t)n);
    c->state = S_HANDSHAKE;
    if (flush(c) < 0) kill_conn(c, &n_handshake_fail);
}

static void send_msg(conn_t *c) {
    size_t off = (size_t)(xr() % (pool_len - (size_t)size));
    c->expect = pool + off;
    uint8_t h[14];
    size_t hl = 2;
    h[0] = 0x82;
    if (size < 126) h[1] = (uint8_t)(0x80 | size);
    else if (size < 65536) { h[1] = 0x80 | 126; h[2] = (uint8_t)(size >> 8); h[3] = (uint8_t)size; hl = 4; }
    else { h[1] = 0x80 | 127; for (int i = 0; i < 8; i++) h[2 + i] = (uint8_t)((uint64_t)size >> (56 - 8 * i)); hl = 10; }
    uint32_t m = (uint32_t)xr();
    memcpy(h + hl, &m, 4);
    uint8_t mk[4];
    memcpy(mk, &m, 4);
    hl += 4;
    buf_put(&c->out, h, hl);
    buf_reserve(&c->out, (size_t)size);
    uint8_t *dst = c->out.p + c->out.len;
    uint64_t m8;
    memcpy(&m8, mk, 4); memcpy((uint8_t *)&m8 + 4, mk, 4);
    size_t i = 0;
    for (; i + 8 <= (size_t)size; i += 8) {
        uint64_t v;
        memcpy(&v, c->expect + i, 8);
        v ^= m8;
        memcpy(dst + i, &v, 8);
    }
    for (; i < (size_t)size; i++) dst[i] = c->expect[i] ^ mk[i & 3];
    c->out.len += (size_t)size;
    c->state = S_WAIT;
    n_pending++;
    n_sent++;
    c->t_sent = now_us();
    if (flush(c) < 0) kill_conn(c, &n_closed);
}

static int want_more(void) {
    return sending && (maxmsgs <= 0 || n_sent < maxmsgs);
}

/* parse input; returns -1 on protocol error / mismatch */
static int on_data(conn_t *c) {
    if (c->state == S_HANDSHAKE) {
        char *s = (char *)buf_data(&c->in);
        char *end = memmem(s, buf_avail(&c->in), "\r\n\r\n", 4);
        if (!end) return buf_avail(&c->in) > 16384 ? -2 : 0;
        char acc[64];
        if (strncmp(s, "HTTP/1.1 101", 12) != 0 ||
            !find_header(s, end + 2, "Sec-WebSocket-Accept", acc, sizeof acc) ||
            strcmp(acc, c->accept) != 0)
            return -2;
        buf_consume(&c->in, (size_t)(end - s) + 4);
        c->state = S_OPEN;
        n_open++;
    }
    for (;;) {
        uint8_t *p = buf_data(&c->in);
        size_t n = buf_avail(&c->in);
        if (n < 2) return 0;
        int op = p[0] & 0x0f, masked = p[1] & 0x80;
        uint64_t len = p[1] & 0x7f;
        size_t h = 2;
        if (len == 126) { if (n < 4) return 0; len = (uint64_t)p[2] << 8 | p[3]; h = 4; }
        else if (len == 127) {
            if (n < 10) return 0;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | p[2 + i];
            h = 10;
        }
        uint8_t mk[4] = {0};
        if (masked) { if (n < h + 4) return 0; memcpy(mk, p + h, 4); h += 4; }
        if (n < h + len) return 0;
        uint8_t *pl = p + h;
        if (masked) for (uint64_t i = 0; i < len; i++) pl[i] ^= mk[i & 3];
        if (op == 0x9 || op == 0xA) {  /* ping/pong from elsewhere: ignore */
            buf_consume(&c->in, h + (size_t)len);
            continue;
        }
        if (op == 0x8) return -3;
        if (c->state != S_WAIT || op != 0x2 || !(p[0] & 0x80) || len != (uint64_t)size ||
            memcmp(pl, c->expect, (size_t)len) != 0)
            return -1;
        buf_consume(&c->in, h + (size_t)len);
        uint64_t t = now_us();
        record(t - c->t_sent);
        n_msgs++;
        n_pending--;
        c->state = S_OPEN;
        if (strcmp(mode, "echo") == 0 && want_more()) send_msg(c);
        if (c->state == S_DEAD) return 0;
    }
}

static void on_event(conn_t *c, uint32_t ev) {
    if (c->state == S_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err || (ev & (EPOLLERR | EPOLLHUP))) { kill_conn(c, &n_connect_fail); return; }
        send_handshake(c);
        return;
    }
    if (ev & EPOLLOUT) {
        if (flush(c) < 0) { kill_conn(c, &n_closed); return; }
    }
    if (!(ev & (EPOLLIN | EPOLLERR | EPOLLHUP))) return;
    for (;;) {
        buf_reserve(&c->in, (size_t)size + 65536);
        ssize_t n = recv(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len, 0);
        if (n > 0) { c->in.len += (size_t)n; if (c->in.len < c->in.cap) break; continue; }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n < 0 && errno == EINTR) continue;
        kill_conn(c, c->state == S_HANDSHAKE ? &n_handshake_fail : &n_closed);
        return;
    }
    int r = on_data(c);
    if (r == -1) kill_conn(c, &n_mismatch);
    else if (r == -2) kill_conn(c, &n_handshake_fail);
    else if (r == -3) kill_conn(c, &n_closed);
}

static void loop_once(int timeout_ms, int *stdin_line) {
    struct epoll_event evs[512];
    int k = epoll_wait(ep, evs, 512, timeout_ms);
    for (int i = 0; i < k; i++) {
        if (evs[i].data.ptr == NULL) {  /* stdin */
            char b[256];
            ssize_t n = read(0, b, sizeof b);
            if (stdin_line && (n <= 0 || memchr(b, '\n', (size_t)n))) *stdin_line = 1;
            if (n <= 0) epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL);
            continue;
        }
        on_event(evs[i].data.ptr, evs[i].events);
    }
}

/* open all connections, at most `ramp` in progress at once; returns elapsed us */
static uint64_t open_all(void) {
    uint64_t t0 = now_us(), deadline = t0 + (uint64_t)(connect_timeout * 1e6);
    int next = 0;
    for (;;) {
        long busy = 0;
        for (int i = 0; i < next; i++)
            if (conns[i].state == S_CONNECTING || conns[i].state == S_HANDSHAKE) busy++;
        while (next < nconns && busy < ramp) { start_connect(&conns[next++]); busy++; }
        if (next >= nconns && busy == 0) break;
        if (now_us() > deadline) {
            for (int i = 0; i < nconns; i++)
                if (conns[i].state == S_CONNECTING || conns[i].state == S_HANDSHAKE)
                    kill_conn(&conns[i], &n_handshake_fail);
            for (; next < nconns; next++) { conns[next].state = S_DEAD; n_connect_fail++; }
            break;
        }
        loop_once(20, NULL);
    }
    return now_us() - t0;
}

static void report(const char *phase, uint64_t dur, uint64_t open_us, long timeouts) {
    printf("WSJSON {\"phase\":\"%s\",\"conns\":%d,\"size\":%d,\"open\":%ld,\"connect_fail\":%ld,"
           "\"handshake_fail\":%ld,\"msgs\":%ld,\"sent\":%ld,\"mismatch\":%ld,\"closed\":%ld,"
           "\"timeouts\":%ld,\"duration_us\":%llu,\"open_us\":%llu,\"p50_us\":%llu,"
           "\"p90_us\":%llu,\"p99_us\":%llu,\"max_us\":%llu}\n",
           phase, nconns, size, n_open, n_connect_fail, n_handshake_fail, n_msgs, n_sent,
           n_mismatch, n_closed, timeouts, (unsigned long long)dur, (unsigned long long)open_us,
           (unsigned long long)pct(50), (unsigned long long)pct(90), (unsigned long long)pct(99),
           (unsigned long long)lat_max);
    fflush(stdout);
}

static long drain(double seconds) {
    uint64_t dl = now_us() + (uint64_t)(seconds * 1e6);
    while (n_pending > 0 && now_us() < dl) loop_once(10, NULL);
    return n_pending;
}

int main(int argc, char **argv) {
    int o;
    while ((o = getopt(argc, argv, "a:p:u:c:s:d:n:m:r:H:T:")) != -1) {
        switch (o) {
        case 'a': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'u': path = optarg; break;
        case 'c': nconns = atoi(optarg); break;
        case 's': size = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'n': maxmsgs = atol(optarg); break;
        case 'm': mode = optarg; break;
        case 'r': ramp = atoi(optarg); break;
        case 'H': hold = atof(optarg); break;
        case 'T': connect_timeout = atof(optarg); break;
        default: fprintf(stderr, "bad option\n"); return 2;
        }
    }
    if (!port || nconns <= 0 || size <= 0) { fprintf(stderr, "need -p PORT, -c>0, -s>0\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    rng ^= (uint64_t)getpid() << 20 ^ now_us();
    pool_len = (1u << 20) + (size_t)size + 1;
    pool = malloc(pool_len);
    for (size_t i = 0; i + 8 <= pool_len; i += 8) { uint64_t r = xr(); memcpy(pool + i, &r, 8); }
    hist = calloc(HIST_MAX, sizeof *hist);
    conns = calloc((size_t)nconns, sizeof *conns);
    for (int i = 0; i < nconns; i++) { conns[i].id = i; conns[i].fd = -1; }
    ep = epoll_create1(0);

    uint64_t open_us = open_all();
    if (strcmp(mode, "idle") == 0) {
        report("ready", 0, open_us, 0);
        struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
        epoll_ctl(ep, EPOLL_CTL_ADD, 0, &e);
        int got = 0;
        uint64_t dl = now_us() + (uint64_t)(hold * 1e6);
        while (!got && now_us() < dl) loop_once(100, &got);
        uint64_t t0 = now_us();
        for (int i = 0; i < nconns; i++)
            if (conns[i].state == S_OPEN) send_msg(&conns[i]);
        long to = drain(30.0);
        report("echo", now_us() - t0, open_us, to);
        return 0;
    }
    uint64_t t0 = now_us(), end = t0 + (uint64_t)(duration * 1e6);
    for (int i = 0; i < nconns && want_more(); i++)
        if (conns[i].state == S_OPEN) send_msg(&conns[i]);
    while (now_us() < end && (n_pending > 0 || want_more())) {
        loop_once(10, NULL);
        if (n_open == 0) break;
    }
    uint64_t dur = now_us() - t0;
    sending = 0;
    long to = drain(5.0);
    report("echo", dur, open_us, to);
    return 0;
}
