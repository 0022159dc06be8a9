/* bench backend: one single-threaded epoll server answering
 *   GET /small  -> 100-byte body        GET /large -> 1 MiB body
 *   GET /ws (Upgrade: websocket) -> RFC 6455 echo (unmasks, echoes data frames,
 *   answers ping with pong, echoes close then closes)
 *   anything else -> 404
 * HTTP/1.1 keep-alive, honours "Connection: close" and HTTP/1.0.
 * usage: backend PORT        prints "LISTEN PORT" once ready.
 */
#include "common.h"

#define LARGE_SIZE (1u << 20)
#define MAX_IN (32u << 20)

enum { M_HTTP, M_WS };

typedef struct {
    int fd, mode, close_after;
    buf_t in, out;
    const uint8_t *big; size_t big_len;   /* pending static body after `out` */
} conn_t;

static int ep;
static uint8_t *large_body;
static char small_resp[512], large_hdr[256], notfound[256];
static size_t small_len, large_hdr_len, notfound_len;

static void conn_close(conn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    buf_free(&c->in); buf_free(&c->out);
    free(c);
}

static int pending(conn_t *c) { return buf_avail(&c->out) > 0 || c->big_len > 0; }

/* returns -1 when the connection must go */
static int flush(conn_t *c) {
    while (pending(c)) {
        ssize_t n;
        if (buf_avail(&c->out)) {
            n = send(c->fd, buf_data(&c->out), buf_avail(&c->out), MSG_NOSIGNAL);
            if (n > 0) { buf_consume(&c->out, (size_t)n); continue; }
        } else {
            n = send(c->fd, c->big, c->big_len, MSG_NOSIGNAL);
            if (n > 0) { c->big += n; c->big_len -= (size_t)n; continue; }
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n < 0 && errno == EINTR) continue;
        return -1;
    }
    struct epoll_event ev = {.data.ptr = c};
    ev.events = pending(c) ? EPOLLOUT : EPOLLIN;
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    if (!pending(c) && c->close_after) return -1;
    return 0;
}

/* process as many complete HTTP requests as possible; stops once output is pending */
static int do_http(conn_t *c) {
    while (!pending(c) && !c->close_after && c->mode == M_HTTP) {
        char *s = (char *)buf_data(&c->in);
        size_t n = buf_avail(&c->in);
        char *end = memmem(s, n, "\r\n\r\n", 4);
        if (!end) return n > 65536 ? -1 : 0;
        size_t hlen = (size_t)(end - s) + 4;
        char *eol = memmem(s, hlen, "\r\n", 2);
        char method[16] = {0}, path[1024] = {0}, ver[16] = {0};
        char line[1100];
        size_t ll = (size_t)(eol - s) < sizeof line - 1 ? (size_t)(eol - s) : sizeof line - 1;
        memcpy(line, s, ll); line[ll] = 0;
        if (sscanf(line, "%15s %1023s %15s", method, path, ver) != 3) return -1;
        char val[256];
        size_t body = 0;
        if (find_header(eol + 2, end + 2, "Content-Length", val, sizeof val)) body = strtoul(val, 0, 10);
        if (buf_avail(&c->in) < hlen + body) return 0;
        int keep = strcmp(ver, "HTTP/1.1") == 0;
        if (find_header(eol + 2, end + 2, "Connection", val, sizeof val)) {
            if (strcasestr(val, "close")) keep = 0;
            else if (strcasestr(val, "keep-alive")) keep = 1;
        }
        char *q = strchr(path, '?');
        if (q) *q = 0;
        char up[64] = {0}, key[128] = {0};
        int is_up = find_header(eol + 2, end + 2, "Upgrade", up, sizeof up) &&
                    strcasecmp(up, "websocket") == 0 &&
                    find_header(eol + 2, end + 2, "Sec-WebSocket-Key", key, sizeof key);
        buf_consume(&c->in, hlen + body);
        const char *conn_close_hdr = keep ? "" : "Connection: close\r\n";
        if (is_up) {
            char acc[32], resp[256];
            ws_accept(key, acc);
            int rl = snprintf(resp, sizeof resp,
                              "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", acc);
            buf_put(&c->out, resp, (size_t)rl);
            c->mode = M_WS;
            break;
        } else if (strcmp(path, "/small") == 0) {
            if (keep) buf_put(&c->out, small_resp, small_len);
            else {
                /* splice the close header in front of the blank line */
                size_t h = (size_t)((char *)memmem(small_resp, small_len, "\r\n\r\n", 4) - small_resp) + 2;
                buf_put(&c->out, small_resp, h);
                buf_put(&c->out, conn_close_hdr, strlen(conn_close_hdr));
                buf_put(&c->out, small_resp + h, small_len - h);
            }
        } else if (strcmp(path, "/large") == 0) {
            buf_put(&c->out, large_hdr, large_hdr_len - 2);
            buf_put(&c->out, conn_close_hdr, strlen(conn_close_hdr));
            buf_put(&c->out, "\r\n", 2);
            if (strcmp(method, "HEAD") != 0) { c->big = large_body; c->big_len = LARGE_SIZE; }
        } else {
            buf_put(&c->out, notfound, notfound_len);
        }
        if (!keep) c->close_after = 1;
    }
    return 0;
}

static int do_ws(conn_t *c) {
    for (;;) {
        uint8_t *p = buf_data(&c->in);
        size_t n = buf_avail(&c->in);
        if (n < 2) return 0;
        int fin = p[0] & 0x80, op = p[0] & 0x0f, masked = p[1] & 0x80;
        uint64_t len = p[1] & 0x7f;
        size_t h = 2;
        if (len == 126) { if (n < 4) return 0; len = (uint64_t)p[2] << 8 | p[3]; h = 4; }
        else if (len == 127) {
            if (n < 10) return 0;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | p[2 + i];
            h = 10;
        }
        if (len > MAX_IN) return -1;
        uint8_t mk[4] = {0};
        if (masked) { if (n < h + 4) return 0; memcpy(mk, p + h, 4); h += 4; }
        if (n < h + len) return 0;
        uint8_t *pl = p + h;
        if (masked) for (uint64_t i = 0; i < len; i++) pl[i] ^= mk[i & 3];
        uint8_t oh[10];
        size_t ohl = 2;
        int oop = op == 0x9 ? 0xA : op;
        oh[0] = (uint8_t)((fin ? 0x80 : 0) | oop);
        if (len < 126) oh[1] = (uint8_t)len;
        else if (len < 65536) { oh[1] = 126; oh[2] = (uint8_t)(len >> 8); oh[3] = (uint8_t)len; ohl = 4; }
        else { oh[1] = 127; for (int i = 0; i < 8; i++) oh[2 + i] = (uint8_t)(len >> (56 - 8 * i)); ohl = 10; }
        if (op != 0xA) {  /* an unsolicited pong is dropped */
            buf_put(&c->out, oh, ohl);
            buf_put(&c->out, pl, (size_t)len);
        }
        buf_consume(&c->in, h + (size_t)len);
        if (op == 0x8) { c->close_after = 1; return 0; }
    }
}

static int pump(conn_t *c) {
    for (;;) {
        size_t before = buf_avail(&c->in);
        int mode = c->mode;
        int r = c->mode == M_HTTP ? do_http(c) : do_ws(c);
        if (r < 0 || flush(c) < 0) return -1;
        if (pending(c)) return 0;
        if (buf_avail(&c->in) == before && c->mode == mode) return 0;
    }
}

static void on_readable(conn_t *c) {
    for (;;) {
        buf_reserve(&c->in, 65536);
        ssize_t n = recv(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len, 0);
        if (n > 0) {
            c->in.len += (size_t)n;
            if (buf_avail(&c->in) > MAX_IN) { conn_close(c); return; }
            if (c->in.len < c->in.cap) break;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n < 0 && errno == EINTR) continue;
        conn_close(c);
        return;
    }
    if (pump(c) < 0) conn_close(c);
}

static void on_writable(conn_t *c) {
    if (pump(c) < 0) conn_close(c);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    large_body = malloc(LARGE_SIZE);
    for (size_t i = 0; i < LARGE_SIZE; i++) large_body[i] = (uint8_t)('a' + i % 26);
    char body[101];
    memset(body, 'x', 99); body[99] = '\n'; body[100] = 0;
    small_len = (size_t)snprintf(small_resp, sizeof small_resp,
        "HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n%s", body);
    large_hdr_len = (size_t)snprintf(large_hdr, sizeof large_hdr,
        "HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: application/octet-stream\r\nContent-Length: %u\r\n\r\n",
        LARGE_SIZE);
    notfound_len = (size_t)snprintf(notfound, sizeof notfound,
        "HTTP/1.1 404 Not Found\r\nServer: bench\r\nContent-Length: 10\r\n\r\nnot found\n");

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    socklen_t al = sizeof a;
    getsockname(ls, (struct sockaddr *)&a, &al);
    printf("LISTEN %d\n", ntohs(a.sin_port));
    fflush(stdout);

    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event evs[256];
    for (;;) {
        int k = epoll_wait(ep, evs, 256, -1);
        if (k < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        for (int i = 0; i < k; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) {
                for (;;) {
                    int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    struct epoll_event e2 = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e2);
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT) on_writable(c);
            else on_readable(c);
        }
    }
}
