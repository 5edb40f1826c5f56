/* A light stand-in for llama.cpp's llama-server b11434, for bench/scale.py's 1,000-pool row: the Python stand-in
 * (tests/fake_engine.py) costs ~15 MB and ~40 ms of CPU to start, which 1,000 of on 2 cores cannot afford.
 *
 * It does what poolmgr relies on: reads `-m FILE` (a missing file: llama.cpp's stderr line, exit 1), binds the
 * unix socket of `--host PATH.sock`, logs `srv  llama_server: listening on unix://PATH` with llama.cpp's log
 * prefix, and answers one request per connection (HTTP/1.x, Connection: close) on GET /health, /slots, /props,
 * /metrics; anything else is a 404. `--version` prints llama.cpp's version line. SIGTERM exits 0. One thread, blocking I/O: ~1 MB resident.
 *
 *     cc -O2 -o fake-llama-server bench/fake_engine.c
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int slots = 1;

static void on_term(int sig) {
    (void)sig;
    _exit(0);
}

static void reply(int fd, int status, const char *body) {
    char head[256];
    const char *text = status == 200 ? "OK" : "Not Found";
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n",
                     status, text, strlen(body));
    if (write(fd, head, (size_t)n) < 0 || write(fd, body, strlen(body)) < 0) {
        return; /* the client left: nothing to do */
    }
}

static void answer(int fd, const char *path) {
    char body[4096];
    if (strcmp(path, "/health") == 0) {
        reply(fd, 200, "{\"status\":\"ok\"}");
    } else if (strcmp(path, "/slots") == 0) {
        size_t used = (size_t)snprintf(body, sizeof body, "[");
        for (int i = 0; i < slots && used < sizeof body - 80; i++) {
            used += (size_t)snprintf(body + used, sizeof body - used, "%s{\"id\":%d,\"n_ctx\":4096,\"is_processing\":false}",
                                     i ? "," : "", i);
        }
        snprintf(body + used, sizeof body - used, "]");
        reply(fd, 200, body);
    } else if (strcmp(path, "/props") == 0) {
        snprintf(body, sizeof body,
                 "{\"total_slots\":%d,\"build_info\":\"b11434-fake\",\"default_generation_settings\":{\"n_ctx\":4096}}",
                 slots);
        reply(fd, 200, body);
    } else if (strcmp(path, "/metrics") == 0) {
        reply(fd, 200,
              "# HELP llamacpp:prompt_tokens_total prompt_tokens_total\n# TYPE llamacpp:prompt_tokens_total counter\n"
              "llamacpp:prompt_tokens_total 0\n# HELP llamacpp:requests_processing requests_processing\n"
              "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 0\n");
    } else {
        reply(fd, 404, "{\"error\":{\"code\":404,\"message\":\"File Not Found\",\"type\":\"not_found_error\"}}");
    }
}

static void serve_one(int fd) {
    char buf[8192];
    size_t got = 0;
    while (got < sizeof buf - 1) {
        ssize_t n = read(fd, buf + got, sizeof buf - 1 - got);
        if (n <= 0) {
            return;
        }
        got += (size_t)n;
        buf[got] = '\0';
        if (strstr(buf, "\r\n\r\n") != NULL) {
            break;
        }
    }
    char method[16], path[1024];
    if (sscanf(buf, "%15s %1023s", method, path) == 2) {
        answer(fd, path);
    }
}

int main(int argc, char **argv) {
    const char *host = NULL, *model = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--version") == 0) {
            fprintf(stderr, "version: 0.6.0-dev (build 11434, commit fake)\nbuilt with cc for Linux\n");
            return 0;
        }
    }
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], "--host") == 0) host = argv[++i];
        else if (strcmp(argv[i], "-m") == 0 || strcmp(argv[i], "--model") == 0) model = argv[++i];
        else if (strcmp(argv[i], "-np") == 0 || strcmp(argv[i], "--parallel") == 0) slots = atoi(argv[++i]);
    }
    if (slots < 1) slots = 1;
    if (model == NULL || access(model, R_OK) != 0) {
        fprintf(stderr, "0.00.000.000 E llama_model_load: error loading model: failed to open %s\n",
                model ? model : "(none)");
        return 1;
    }
    if (host == NULL || strlen(host) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        fprintf(stderr, "0.00.000.000 E srv  llama_server: --host must name a unix socket (PATH.sock)\n");
        return 1;
    }
    signal(SIGTERM, on_term);
    signal(SIGPIPE, SIG_IGN);
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, host, sizeof addr.sun_path - 1);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(lfd, 64) != 0) {
        fprintf(stderr, "0.00.000.000 E srv  llama_server: couldn't bind HTTP server socket, hostname: %s\n", host);
        return 1;
    }
    fprintf(stderr, "0.00.001.000 I srv  llama_server: listening on unix://%s\n", host);
    fflush(stderr);
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            continue;
        }
        serve_one(fd);
        close(fd);
    }
}
