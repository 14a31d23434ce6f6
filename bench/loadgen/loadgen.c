/*
 * loadgen: a closed-loop HTTP/1.1 load generator for the zaiproxy bench suite.
 *
 * One thread, one epoll loop, N keep-alive connections. Each connection sends
 * the same raw request bytes (--request FILE) again as soon as the previous
 * response is complete. Responses are parsed incrementally (content-length,
 * chunked with extensions and trailers, or until EOF) and optionally verified:
 * status (--expect-status), a byte-identical de-chunked body (--expect-body)
 * and an SSE stream ending in "data: [DONE]" with a "usage" event (--sse).
 *
 * Per measured request it stores latency (first request byte written -> last
 * response byte read) and ttfb (first request byte written -> first de-framed
 * body byte read; the end of the response when the body is empty) in
 * microseconds, and prints one JSON object with exact percentiles at the end.
 *
 * Counting rules: completions, errors, reconnects, events and bytes count only
 * inside the measured window (after --warmup, before --duration ends or
 * --max-requests is reached). A failed request counts once, under its first
 * failing kind, and its connection is replaced. A reused keep-alive connection
 * that the server closes before any byte of the next response is a reconnect
 * (the request is sent again on a fresh connection), not an error; on a fresh
 * connection the same thing is a "reset". --sse coalescing: for every read()
 * that completes k >= 1 events, coalesced_events += k - 1; event_gap_us is
 * the time between consecutive event-completing reads of one response.
 *
 * Build: gcc -O2 -Wall -Wextra -o loadgen loadgen.c -lm
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define RBUF_SIZE (64 * 1024)
#define HEAD_MAX (16 * 1024)
#define CLINE_MAX 1024
#define SSE_PFX 16
#define SCAN_NS 10000000ULL          /* timers (reconnects, timeouts) every 10 ms */
#define CONNECT_RETRY_NS 10000000ULL /* wait after a failed connect */
#define NEEDLE "\"usage\""
#define NEEDLE_LEN 7

enum { ST_IDLE, ST_CONNECTING, ST_ACTIVE };
enum { P_HEAD, P_BODY_CL, P_BODY_EOF, P_CHUNK_SIZE, P_CHUNK_DATA, P_CHUNK_CRLF, P_TRAILER };
enum { FEED_MORE, FEED_DONE, FEED_FAIL };
enum { E_CONNECT, E_RESET, E_TIMEOUT, E_PARSE, E_BODY, E_SSE_DONE, E_SSE_USAGE, E_STATUS, E_KINDS };
static const char *const KIND_NAMES[] = {"connect",     "reset",       "timeout",      "parse",
                                         "body_mismatch", "sse_no_done", "sse_no_usage", "status"};

typedef struct {
    uint32_t *v;
    size_t n, cap;
} u32vec;

typedef struct conn {
    int fd;
    int state;
    uint32_t interest; /* current epoll interest */
    int reused;        /* this fd completed at least one response */
    uint64_t wake_at;  /* ST_IDLE: connect again at this time */
    uint64_t progress; /* last time bytes moved (or the connect / request began) */
    uint64_t t_start;  /* first request byte written */
    uint64_t t_body;   /* first body byte read (0 = none yet) */
    size_t wpos;       /* request bytes written */
    size_t resp_bytes; /* raw bytes of the current response read */
    int queued;        /* in the open-now queue */
    /* response parser */
    int ps;
    size_t hlen, hline;
    int status, close_after;
    uint64_t remaining;
    char cline[CLINE_MAX];
    size_t clen;
    int fkind, fstatus; /* failure of the current response */
    /* --expect-body */
    size_t exp_pos;
    /* --sse */
    char pfx[SSE_PFX]; /* first bytes of the current line */
    size_t llen;       /* length of the current line so far */
    char lastch;
    int ev_lines, ev_data_lines, ev_done, last_data_done, usage_seen;
    char tail[NEEDLE_LEN];
    size_t tail_len;
    uint32_t events, coalesced, read_events;
    uint64_t last_event_t;
    u32vec gaps;
    char head[HEAD_MAX];
} conn;

/* ---- options and global state ---- */
static const char *opt_host;
static int opt_port = -1, opt_conns = -1;
static double opt_duration = -1, opt_warmup = 0, opt_timeout = 30;
static unsigned long long opt_max = 5000000ULL;
static char *req_buf, *exp_buf;
static size_t req_len, exp_len;
static int have_exp, opt_sse, req_is_head;
static unsigned char allowed_status[1000];
static int n_allowed;

static struct sockaddr_storage addr;
static socklen_t addr_len;
static int epfd;
static conn *conns;
static conn **open_queue;
static size_t open_queue_n;
static uint64_t t_begin, t_warm, t_end, timeout_ns;
static int stopping;
static uint64_t t_last_done;

static u32vec lat, ttfb;
static uint64_t n_requests, n_warmup_requests, n_reconnects, n_bytes, n_events, n_coalesced;
static uint64_t err_kind[E_KINDS], err_status[1000];
static char rbuf[RBUF_SIZE];

/* event gaps: a log-linear histogram (0.1% resolution), exact max and sum */
#define HB_SUB 512
#define HB_COUNT (2 * HB_SUB + 22 * HB_SUB)
static uint64_t gap_hist[HB_COUNT], gap_n, gap_sum;
static uint32_t gap_max;

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die_usage(const char *msg, const char *arg) {
    if (arg)
        fprintf(stderr, "loadgen: %s: %s\n", msg, arg);
    else
        fprintf(stderr, "loadgen: %s\n", msg);
    fprintf(stderr,
            "usage: loadgen --host HOST --port PORT --connections N --duration SECONDS\n"
            "               [--warmup SECONDS] [--max-requests N] --request FILE\n"
            "               [--expect-status CODE]... [--expect-body FILE] [--sse]\n"
            "               [--timeout SECONDS]\n");
    exit(2);
}

static void vec_push(u32vec *a, uint32_t x) {
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 4096;
        uint32_t *v = realloc(a->v, cap * sizeof *v);
        if (!v) {
            fprintf(stderr, "loadgen: out of memory\n");
            exit(1);
        }
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
}

static uint32_t to_us(uint64_t ns) {
    uint64_t us = ns / 1000;
    return us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

static unsigned hist_index(uint32_t v) {
    if (v < 2 * HB_SUB) return v;
    int e = (31 - __builtin_clz(v)) - 9; /* v >> e is in [512, 1023] */
    return 2 * HB_SUB + (unsigned)(e - 1) * HB_SUB + ((v >> e) - HB_SUB);
}

static uint32_t hist_value(unsigned idx) {
    if (idx < 2 * HB_SUB) return idx;
    unsigned e = (idx - 2 * HB_SUB) / HB_SUB + 1, m = (idx - 2 * HB_SUB) % HB_SUB + HB_SUB;
    return (m << e) + ((1u << e) >> 1);
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die_usage("cannot open", path);
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf) die_usage("out of memory reading", path);
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        cap *= 2;
        buf = realloc(buf, cap);
    }
    if (ferror(f)) die_usage("cannot read", path);
    fclose(f);
    *len = n;
    return buf;
}

static double parse_double(const char *s, const char *name) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v)) die_usage(name, s);
    return v;
}

static long long parse_int(const char *s, const char *name) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end) die_usage(name, s);
    return v;
}

/* ---- connection plumbing ---- */

static int measuring(uint64_t now) { return !stopping && now >= t_warm && now < t_end; }

static void set_interest(conn *c, uint32_t ev) {
    if (c->interest == ev) return;
    struct epoll_event e = {.events = ev, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &e);
    c->interest = ev;
}

static void close_conn(conn *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->state = ST_IDLE;
}

static void queue_open(conn *c, uint64_t at) {
    c->wake_at = at;
    if (at == 0 && !c->queued) {
        c->queued = 1;
        open_queue[open_queue_n++] = c;
    }
}

static void reset_response(conn *c) {
    c->ps = P_HEAD;
    c->hlen = c->hline = 0;
    c->status = 0;
    c->close_after = 0;
    c->remaining = 0;
    c->clen = 0;
    c->resp_bytes = 0;
    c->t_body = 0;
    c->exp_pos = 0;
    c->llen = 0;
    c->lastch = 0;
    c->ev_lines = c->ev_data_lines = c->ev_done = c->last_data_done = c->usage_seen = 0;
    c->tail_len = 0;
    c->events = c->coalesced = c->read_events = 0;
    c->last_event_t = 0;
    c->gaps.n = 0;
}

/* A failed request (or connect): count it once, close, reconnect. */
static void fail(conn *c, int kind, int status, uint64_t now) {
    if (measuring(now)) {
        if (kind == E_STATUS)
            err_status[status]++;
        else
            err_kind[kind]++;
    }
    close_conn(c);
    queue_open(c, kind == E_CONNECT ? now + CONNECT_RETRY_NS : 0);
}

/* The connection went away without it being the request's fault (reused keep-alive
 * connection closed by the server before any byte of the next response). */
static void reconnect(conn *c, uint64_t now) {
    if (measuring(now)) n_reconnects++;
    close_conn(c);
    queue_open(c, 0);
}

static void do_write(conn *c);

static void start_request(conn *c) {
    reset_response(c);
    c->wpos = 0;
    c->t_start = mono_ns();
    c->progress = c->t_start;
    do_write(c);
}

static void open_conn(conn *c) {
    uint64_t now = mono_ns();
    c->queued = 0;
    c->reused = 0;
    c->progress = now;
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fail(c, E_CONNECT, 0, now);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    int r = connect(fd, (struct sockaddr *)&addr, addr_len);
    if (r < 0 && errno != EINPROGRESS) {
        fail(c, E_CONNECT, 0, now);
        return;
    }
    struct epoll_event e = {.events = r == 0 ? EPOLLIN : EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e) < 0) {
        fail(c, E_CONNECT, 0, now);
        return;
    }
    c->interest = e.events;
    if (r == 0) {
        c->state = ST_ACTIVE;
        start_request(c);
    } else {
        c->state = ST_CONNECTING;
    }
}

/* The peer closed or reset the connection while a request was in flight. */
static void peer_gone(conn *c, uint64_t now) {
    if (c->resp_bytes == 0 && c->reused)
        reconnect(c, now); /* stale keep-alive connection: retry on a fresh one */
    else
        fail(c, E_RESET, 0, now);
}

static void do_write(conn *c) {
    size_t before = c->wpos;
    while (c->wpos < req_len) {
        ssize_t w = send(c->fd, req_buf + c->wpos, req_len - c->wpos, MSG_NOSIGNAL);
        if (w > 0) {
            c->wpos += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (c->wpos > before) c->progress = mono_ns();
            set_interest(c, EPOLLIN | EPOLLOUT);
            return;
        }
        peer_gone(c, mono_ns());
        return;
    }
    c->progress = mono_ns();
    set_interest(c, EPOLLIN);
}

/* ---- response parsing ---- */

/* Does the comma-separated header value contain the token (case-insensitive)? */
static int has_token(const char *v, size_t n, const char *tok) {
    size_t k = strlen(tok), i = 0;
    while (i < n) {
        while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ',')) i++;
        size_t s = i;
        while (i < n && v[i] != ',') i++;
        size_t e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
        if (e - s == k && strncasecmp(v + s, tok, k) == 0) return 1;
    }
    return 0;
}

/* Parse the buffered head. 0 = ok, -1 = malformed. Sets status, framing, close_after. */
static int parse_head(conn *c, int *chunked, long long *clen) {
    char *h = c->head;
    size_t n = c->hlen;
    char *eol = memchr(h, '\n', n);
    if (!eol) return -1;
    size_t ll = (size_t)(eol - h);
    if (ll && h[ll - 1] == '\r') ll--;
    if (ll < 12 || memcmp(h, "HTTP/1.", 7) != 0 || (h[7] != '0' && h[7] != '1') || h[8] != ' ')
        return -1;
    for (int k = 9; k < 12; k++)
        if (h[k] < '0' || h[k] > '9') return -1;
    if (ll > 12 && h[12] != ' ') return -1;
    c->status = (h[9] - '0') * 100 + (h[10] - '0') * 10 + (h[11] - '0');
    if (c->status < 100) return -1;
    int http10 = h[7] == '0', keep_alive = 0, close = 0;
    *chunked = 0;
    *clen = -1;
    size_t pos = (size_t)(eol - h) + 1;
    while (pos < n) {
        char *e = memchr(h + pos, '\n', n - pos);
        if (!e) return -1;
        char *line = h + pos;
        size_t len = (size_t)(e - line);
        pos += len + 1;
        if (len && line[len - 1] == '\r') len--;
        if (len == 0) break; /* the blank line ending the head */
        if (line[0] == ' ' || line[0] == '\t') continue; /* obsolete folding: ignored */
        char *colon = memchr(line, ':', len);
        if (!colon || colon == line) return -1;
        size_t nlen = (size_t)(colon - line);
        char *v = colon + 1;
        size_t vlen = len - nlen - 1;
        while (vlen && (*v == ' ' || *v == '\t')) v++, vlen--;
        while (vlen && (v[vlen - 1] == ' ' || v[vlen - 1] == '\t')) vlen--;
        if (nlen == 14 && strncasecmp(line, "content-length", 14) == 0) {
            if (vlen == 0 || vlen > 18) return -1;
            long long x = 0;
            for (size_t k = 0; k < vlen; k++) {
                if (v[k] < '0' || v[k] > '9') return -1;
                x = x * 10 + (v[k] - '0');
            }
            if (*clen >= 0 && *clen != x) return -1;
            *clen = x;
        } else if (nlen == 17 && strncasecmp(line, "transfer-encoding", 17) == 0) {
            if (has_token(v, vlen, "chunked")) *chunked = 1;
        } else if (nlen == 10 && strncasecmp(line, "connection", 10) == 0) {
            if (has_token(v, vlen, "close")) close = 1;
            if (has_token(v, vlen, "keep-alive")) keep_alive = 1;
        }
    }
    c->close_after = close || (http10 && !keep_alive);
    return 0;
}

static void usage_scan(conn *c, const char *p, size_t n) {
    if (c->tail_len) {
        char tmp[2 * NEEDLE_LEN];
        size_t k = n < NEEDLE_LEN - 1 ? n : NEEDLE_LEN - 1;
        memcpy(tmp, c->tail, c->tail_len);
        memcpy(tmp + c->tail_len, p, k);
        if (memmem(tmp, c->tail_len + k, NEEDLE, NEEDLE_LEN)) {
            c->usage_seen = 1;
            return;
        }
    }
    if (memmem(p, n, NEEDLE, NEEDLE_LEN)) {
        c->usage_seen = 1;
        return;
    }
    if (n >= NEEDLE_LEN - 1) {
        memcpy(c->tail, p + n - (NEEDLE_LEN - 1), NEEDLE_LEN - 1);
        c->tail_len = NEEDLE_LEN - 1;
    } else {
        char tmp[2 * NEEDLE_LEN];
        memcpy(tmp, c->tail, c->tail_len);
        memcpy(tmp + c->tail_len, p, n);
        size_t t = c->tail_len + n, keep = t < NEEDLE_LEN - 1 ? t : NEEDLE_LEN - 1;
        memcpy(c->tail, tmp + t - keep, keep);
        c->tail_len = keep;
    }
}

static void sse_line_end(conn *c) {
    size_t len = c->llen;
    if (len && c->lastch == '\r') len--;
    if (len == 0) {
        if (c->ev_lines) { /* a blank line ends an event */
            c->events++;
            c->read_events++;
            if (c->ev_data_lines) c->last_data_done = c->ev_done;
            c->ev_lines = c->ev_data_lines = c->ev_done = 0;
        }
    } else {
        c->ev_lines++;
        if (len >= 5 && memcmp(c->pfx, "data:", 5) == 0) {
            c->ev_data_lines++;
            const char *v = c->pfx + 5;
            size_t vl = len - 5;
            if (vl && *v == ' ') v++, vl--;
            c->ev_done = c->ev_data_lines == 1 && len <= SSE_PFX && vl == 6 &&
                         memcmp(v, "[DONE]", 6) == 0;
        }
    }
    c->llen = 0;
    c->lastch = 0;
}

static void sse_feed(conn *c, const char *p, size_t n) {
    if (!c->usage_seen) usage_scan(c, p, n);
    while (n) {
        const char *nl = memchr(p, '\n', n);
        size_t seg = nl ? (size_t)(nl - p) : n;
        if (c->llen < SSE_PFX) {
            size_t k = SSE_PFX - c->llen < seg ? SSE_PFX - c->llen : seg;
            memcpy(c->pfx + c->llen, p, k);
        }
        if (seg) c->lastch = p[seg - 1];
        c->llen += seg;
        if (!nl) break;
        sse_line_end(c);
        p += seg + 1;
        n -= seg + 1;
    }
}

/* End of one read() for SSE accounting: coalescing and gaps between event-completing reads. */
static void sse_read_end(conn *c, uint64_t now) {
    if (!c->read_events) return;
    c->coalesced += c->read_events - 1;
    if (c->last_event_t) vec_push(&c->gaps, to_us(now - c->last_event_t));
    c->last_event_t = now;
    c->read_events = 0;
}

/* De-framed body bytes. 0 = ok, -1 = verification failed (fkind set). */
static int body_data(conn *c, const char *p, size_t n, uint64_t now) {
    if (!n) return 0;
    if (!c->t_body) c->t_body = now;
    if (have_exp) {
        if (c->exp_pos + n > exp_len || memcmp(exp_buf + c->exp_pos, p, n) != 0) {
            c->fkind = E_BODY;
            return -1;
        }
        c->exp_pos += n;
    }
    if (opt_sse) sse_feed(c, p, n);
    return 0;
}

static int head_done(conn *c) {
    int chunked;
    long long clen;
    if (parse_head(c, &chunked, &clen) < 0) {
        c->fkind = E_PARSE;
        return FEED_FAIL;
    }
    if (c->status < 200) {
        if (c->status == 101) {
            c->fkind = E_PARSE;
            return FEED_FAIL;
        }
        c->hlen = c->hline = 0; /* 1xx: an interim head, the real one follows */
        return FEED_MORE;
    }
    if (c->status > 999 || !allowed_status[c->status]) {
        c->fkind = E_STATUS;
        c->fstatus = c->status;
        return FEED_FAIL;
    }
    if (req_is_head || c->status == 204 || c->status == 304) return FEED_DONE;
    if (chunked) {
        c->ps = P_CHUNK_SIZE;
        c->clen = 0;
    } else if (clen >= 0) {
        if (clen == 0) return FEED_DONE;
        c->ps = P_BODY_CL;
        c->remaining = (uint64_t)clen;
    } else {
        c->ps = P_BODY_EOF;
        c->close_after = 1;
    }
    return FEED_MORE;
}

static int parse_chunk_size(conn *c) {
    size_t n = c->clen, i = 0;
    if (n && c->cline[n - 1] == '\r') n--;
    uint64_t x = 0;
    int digits = 0;
    for (; i < n; i++) {
        char ch = c->cline[i];
        int d;
        if (ch >= '0' && ch <= '9')
            d = ch - '0';
        else if (ch >= 'a' && ch <= 'f')
            d = ch - 'a' + 10;
        else if (ch >= 'A' && ch <= 'F')
            d = ch - 'A' + 10;
        else
            break;
        if (++digits > 15) return -1;
        x = x * 16 + (uint64_t)d;
    }
    if (!digits) return -1;
    while (i < n && (c->cline[i] == ' ' || c->cline[i] == '\t')) i++;
    if (i < n && c->cline[i] != ';') return -1;
    c->remaining = x;
    return 0;
}

/* Feed raw response bytes. On FEED_DONE, *used says how many bytes belonged to it. */
static int feed(conn *c, const char *buf, size_t n, uint64_t now, size_t *used) {
    size_t i = 0;
    while (i < n) {
        switch (c->ps) {
        case P_HEAD: {
            const char *nl = memchr(buf + i, '\n', n - i);
            size_t seg = nl ? (size_t)(nl - (buf + i)) + 1 : n - i;
            if (c->hlen + seg > HEAD_MAX) {
                c->fkind = E_PARSE;
                return FEED_FAIL;
            }
            memcpy(c->head + c->hlen, buf + i, seg);
            c->hlen += seg;
            i += seg;
            if (!nl) break;
            size_t ll = c->hlen - c->hline - 1;
            if (ll && c->head[c->hlen - 2] == '\r') ll--;
            if (ll) {
                c->hline = c->hlen;
                break;
            }
            if (c->hline == 0) { /* blank line before the status line: skip it */
                c->hlen = 0;
                break;
            }
            int r = head_done(c);
            if (r == FEED_FAIL) return r;
            if (r == FEED_DONE) {
                *used = i;
                return r;
            }
            break;
        }
        case P_BODY_CL: {
            size_t take = n - i < c->remaining ? n - i : (size_t)c->remaining;
            if (body_data(c, buf + i, take, now) < 0) return FEED_FAIL;
            i += take;
            c->remaining -= take;
            if (!c->remaining) {
                *used = i;
                return FEED_DONE;
            }
            break;
        }
        case P_BODY_EOF:
            if (body_data(c, buf + i, n - i, now) < 0) return FEED_FAIL;
            i = n;
            break;
        case P_CHUNK_SIZE:
        case P_TRAILER: {
            const char *nl = memchr(buf + i, '\n', n - i);
            size_t seg = nl ? (size_t)(nl - (buf + i)) : n - i;
            if (c->clen + seg > CLINE_MAX) {
                c->fkind = E_PARSE;
                return FEED_FAIL;
            }
            memcpy(c->cline + c->clen, buf + i, seg);
            c->clen += seg;
            i += seg;
            if (!nl) break;
            i++; /* the '\n' */
            if (c->ps == P_TRAILER) {
                size_t len = c->clen;
                if (len && c->cline[len - 1] == '\r') len--;
                c->clen = 0;
                if (len == 0) {
                    *used = i;
                    return FEED_DONE;
                }
                break;
            }
            if (parse_chunk_size(c) < 0) {
                c->fkind = E_PARSE;
                return FEED_FAIL;
            }
            c->clen = 0;
            c->ps = c->remaining ? P_CHUNK_DATA : P_TRAILER;
            break;
        }
        case P_CHUNK_DATA: {
            size_t take = n - i < c->remaining ? n - i : (size_t)c->remaining;
            if (body_data(c, buf + i, take, now) < 0) return FEED_FAIL;
            i += take;
            c->remaining -= take;
            if (!c->remaining) {
                c->ps = P_CHUNK_CRLF;
                c->clen = 0;
            }
            break;
        }
        case P_CHUNK_CRLF: {
            char ch = buf[i++];
            if (ch == '\r' && c->clen == 0) {
                c->clen = 1;
            } else if (ch == '\n') {
                c->clen = 0;
                c->ps = P_CHUNK_SIZE;
            } else {
                c->fkind = E_PARSE;
                return FEED_FAIL;
            }
            break;
        }
        }
    }
    *used = n;
    return FEED_MORE;
}

/* A response is complete: verify what only the end can tell, record, go on. */
static void complete(conn *c, uint64_t now, int leftover) {
    int kind = -1;
    if (have_exp && c->exp_pos != exp_len)
        kind = E_BODY;
    else if (opt_sse && !c->last_data_done)
        kind = E_SSE_DONE;
    else if (opt_sse && !c->usage_seen)
        kind = E_SSE_USAGE;
    if (kind >= 0) {
        fail(c, kind, 0, now);
        return;
    }
    if (measuring(now)) {
        vec_push(&lat, to_us(now - c->t_start));
        vec_push(&ttfb, to_us((c->t_body ? c->t_body : now) - c->t_start));
        n_events += c->events;
        n_coalesced += c->coalesced;
        for (size_t k = 0; k < c->gaps.n; k++) {
            uint32_t g = c->gaps.v[k];
            gap_hist[hist_index(g)]++;
            gap_n++;
            gap_sum += g;
            if (g > gap_max) gap_max = g;
        }
        n_requests++;
        t_last_done = now;
        if (n_requests >= opt_max) stopping = 1;
    } else if (now < t_warm) {
        n_warmup_requests++;
    }
    c->reused = 1;
    if (c->close_after || leftover || c->wpos < req_len) {
        reconnect(c, now);
        return;
    }
    if (!stopping) start_request(c);
}

static void do_read(conn *c) {
    for (;;) {
        ssize_t r = read(c->fd, rbuf, sizeof rbuf);
        uint64_t now = mono_ns();
        if (r > 0) {
            if (measuring(now)) n_bytes += (uint64_t)r;
            c->progress = now;
            c->resp_bytes += (size_t)r;
            size_t used = 0;
            int res = feed(c, rbuf, (size_t)r, now, &used);
            if (opt_sse) sse_read_end(c, now);
            if (res == FEED_FAIL) {
                fail(c, c->fkind, c->fstatus, now);
                return;
            }
            if (res == FEED_DONE) {
                complete(c, now, used < (size_t)r);
                return;
            }
            if ((size_t)r < sizeof rbuf) return;
            continue;
        }
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        /* EOF or an error (ECONNRESET, ...) */
        if (r == 0 && c->ps == P_BODY_EOF) {
            complete(c, now, 0); /* close-delimited body: EOF is its end */
            return;
        }
        peer_gone(c, now);
        return;
    }
}

static void on_event(conn *c, uint32_t ev) {
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
        if (err) {
            fail(c, E_CONNECT, 0, mono_ns());
            return;
        }
        c->state = ST_ACTIVE;
        set_interest(c, EPOLLIN);
        start_request(c);
        return;
    }
    if (c->state != ST_ACTIVE) return;
    int fd = c->fd;
    if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) do_read(c);
    if (c->state == ST_ACTIVE && c->fd == fd && (ev & EPOLLOUT) && c->wpos < req_len) do_write(c);
}

static void scan_timers(uint64_t now) {
    for (int k = 0; k < opt_conns; k++) {
        conn *c = &conns[k];
        if (c->state == ST_IDLE) {
            if (!c->queued && c->wake_at && now >= c->wake_at) queue_open(c, 0);
        } else if (now - c->progress > timeout_ns && now > c->progress) {
            fail(c, c->state == ST_CONNECTING ? E_CONNECT : E_TIMEOUT, 0, now);
        }
    }
}

/* ---- output ---- */

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static uint32_t pct(const u32vec *a, double p) {
    if (!a->n) return 0;
    size_t rank = (size_t)ceil(p * (double)a->n);
    if (rank < 1) rank = 1;
    return a->v[rank - 1];
}

static void print_dist(const char *name, u32vec *a) {
    if (a->n) qsort(a->v, a->n, sizeof *a->v, cmp_u32);
    double sum = 0;
    for (size_t k = 0; k < a->n; k++) sum += a->v[k];
    printf("\"%s\": {\"p50\": %u, \"p90\": %u, \"p99\": %u, \"max\": %u, \"mean\": %.1f}", name,
           pct(a, 0.50), pct(a, 0.90), pct(a, 0.99), a->n ? a->v[a->n - 1] : 0,
           a->n ? sum / (double)a->n : 0.0);
}

static uint32_t hist_pct(double p) {
    if (!gap_n) return 0;
    uint64_t rank = (uint64_t)ceil(p * (double)gap_n), seen = 0;
    if (rank < 1) rank = 1;
    for (unsigned k = 0; k < HB_COUNT; k++) {
        seen += gap_hist[k];
        if (seen >= rank) {
            uint32_t v = hist_value(k);
            return v > gap_max ? gap_max : v;
        }
    }
    return gap_max;
}

static void print_result(double window, double cpu) {
    printf("{\"requests\": %llu, \"errors\": {", (unsigned long long)n_requests);
    uint64_t total = 0;
    int first = 1;
    for (int k = 0; k < E_STATUS; k++) {
        if (!err_kind[k]) continue;
        printf("%s\"%s\": %llu", first ? "" : ", ", KIND_NAMES[k], (unsigned long long)err_kind[k]);
        total += err_kind[k];
        first = 0;
    }
    for (int s = 0; s < 1000; s++) {
        if (!err_status[s]) continue;
        printf("%s\"status_%d\": %llu", first ? "" : ", ", s, (unsigned long long)err_status[s]);
        total += err_status[s];
        first = 0;
    }
    printf("}, \"errors_total\": %llu, \"duration_s\": %.3f, \"rps\": %.1f, \"reconnects\": %llu, ",
           (unsigned long long)total, window, window > 0 ? (double)n_requests / window : 0.0,
           (unsigned long long)n_reconnects);
    print_dist("latency_us", &lat);
    printf(", ");
    print_dist("ttfb_us", &ttfb);
    printf(", \"events\": %llu, \"coalesced_events\": %llu, ", (unsigned long long)n_events,
           (unsigned long long)n_coalesced);
    printf("\"event_gap_us\": {\"p50\": %u, \"p90\": %u, \"p99\": %u, \"max\": %u, \"mean\": %.1f, "
           "\"count\": %llu}, ",
           hist_pct(0.50), hist_pct(0.90), hist_pct(0.99), gap_max,
           gap_n ? (double)gap_sum / (double)gap_n : 0.0, (unsigned long long)gap_n);
    printf("\"bytes_received\": %llu, \"cpu_s\": %.3f, \"connections\": %d, "
           "\"warmup_requests\": %llu, \"max_requests_reached\": %s}\n",
           (unsigned long long)n_bytes, cpu, opt_conns, (unsigned long long)n_warmup_requests,
           n_requests >= opt_max ? "true" : "false");
}

/* ---- main ---- */

static void parse_args(int argc, char **argv) {
    static const struct option longopts[] = {
        {"host", required_argument, 0, 'h'},          {"port", required_argument, 0, 'p'},
        {"connections", required_argument, 0, 'c'},   {"duration", required_argument, 0, 'd'},
        {"warmup", required_argument, 0, 'w'},        {"max-requests", required_argument, 0, 'm'},
        {"request", required_argument, 0, 'r'},       {"expect-status", required_argument, 0, 's'},
        {"expect-body", required_argument, 0, 'b'},   {"sse", no_argument, 0, 'S'},
        {"timeout", required_argument, 0, 't'},       {0, 0, 0, 0}};
    const char *req_path = NULL, *exp_path = NULL;
    opterr = 0;
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'h': opt_host = optarg; break;
        case 'p': {
            long long v = parse_int(optarg, "bad --port");
            if (v < 1 || v > 65535) die_usage("bad --port", optarg);
            opt_port = (int)v;
            break;
        }
        case 'c': {
            long long v = parse_int(optarg, "bad --connections");
            if (v < 1 || v > 1000000) die_usage("bad --connections", optarg);
            opt_conns = (int)v;
            break;
        }
        case 'd':
            opt_duration = parse_double(optarg, "bad --duration");
            if (opt_duration <= 0) die_usage("bad --duration", optarg);
            break;
        case 'w':
            opt_warmup = parse_double(optarg, "bad --warmup");
            if (opt_warmup < 0) die_usage("bad --warmup", optarg);
            break;
        case 'm': {
            long long v = parse_int(optarg, "bad --max-requests");
            if (v < 1) die_usage("bad --max-requests", optarg);
            opt_max = (unsigned long long)v;
            break;
        }
        case 'r': req_path = optarg; break;
        case 's': {
            long long v = parse_int(optarg, "bad --expect-status");
            if (v < 100 || v > 999) die_usage("bad --expect-status", optarg);
            allowed_status[v] = 1;
            n_allowed++;
            break;
        }
        case 'b': exp_path = optarg; break;
        case 'S': opt_sse = 1; break;
        case 't':
            opt_timeout = parse_double(optarg, "bad --timeout");
            if (opt_timeout <= 0) die_usage("bad --timeout", optarg);
            break;
        default:
            die_usage("unknown or incomplete option", optind > 1 ? argv[optind - 1] : NULL);
        }
    }
    if (optind < argc) die_usage("unexpected argument", argv[optind]);
    if (!opt_host) die_usage("--host is required", NULL);
    if (opt_port < 0) die_usage("--port is required", NULL);
    if (opt_conns < 0) die_usage("--connections is required", NULL);
    if (opt_duration < 0) die_usage("--duration is required", NULL);
    if (!req_path) die_usage("--request is required", NULL);
    if (!n_allowed) allowed_status[200] = 1;
    req_buf = read_file(req_path, &req_len);
    if (!req_len) die_usage("empty request file", req_path);
    req_is_head = req_len >= 5 && memcmp(req_buf, "HEAD ", 5) == 0;
    if (exp_path) {
        exp_buf = read_file(exp_path, &exp_len);
        have_exp = 1;
    }
}

static void resolve(void) {
    struct addrinfo hints = {0}, *res;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    char port[16];
    snprintf(port, sizeof port, "%d", opt_port);
    int r = getaddrinfo(opt_host, port, &hints, &res);
    if (r != 0) die_usage("cannot resolve --host", gai_strerror(r));
    memcpy(&addr, res->ai_addr, res->ai_addrlen);
    addr_len = res->ai_addrlen;
    freeaddrinfo(res);
}

static void raise_fd_limit(void) {
    struct rlimit rl;
    rlim_t need = (rlim_t)opt_conns + 64;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < need) {
        rl.rlim_cur = rl.rlim_max < need ? rl.rlim_max : need;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    resolve();
    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) {
        perror("loadgen: epoll_create1");
        return 1;
    }
    conns = calloc((size_t)opt_conns, sizeof *conns);
    open_queue = calloc((size_t)opt_conns, sizeof *open_queue);
    if (!conns || !open_queue) {
        fprintf(stderr, "loadgen: out of memory\n");
        return 1;
    }
    timeout_ns = (uint64_t)(opt_timeout * 1e9);
    t_begin = mono_ns();
    t_warm = t_begin + (uint64_t)(opt_warmup * 1e9);
    t_end = t_warm + (uint64_t)(opt_duration * 1e9);
    for (int k = 0; k < opt_conns; k++) {
        conns[k].fd = -1;
        open_conn(&conns[k]);
    }
    struct epoll_event evs[256];
    uint64_t next_scan = t_begin + SCAN_NS;
    for (;;) {
        uint64_t now = mono_ns();
        if (stopping || now >= t_end) break;
        while (open_queue_n && !stopping) open_conn(open_queue[--open_queue_n]);
        if (now >= next_scan) {
            scan_timers(now);
            next_scan = now + SCAN_NS;
            continue; /* open what the scan queued */
        }
        uint64_t wait_ns = next_scan - now;
        if (t_end - now < wait_ns) wait_ns = t_end - now;
        int ms = (int)((wait_ns + 999999) / 1000000);
        int n = epoll_wait(epfd, evs, 256, ms);
        if (n < 0 && errno != EINTR) {
            perror("loadgen: epoll_wait");
            return 1;
        }
        for (int k = 0; k < n && !stopping; k++) on_event(evs[k].data.ptr, evs[k].events);
    }
    uint64_t t_stop = mono_ns();
    for (int k = 0; k < opt_conns; k++) close_conn(&conns[k]);
    /* The measured window: ends at --duration, or at the completion that hit --max-requests. */
    uint64_t end = stopping && t_last_done ? t_last_done : (t_stop < t_end ? t_stop : t_end);
    double window = end > t_warm ? (double)(end - t_warm) / 1e9 : 0.0;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
                 (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    print_result(window, cpu);
    return 0;
}
