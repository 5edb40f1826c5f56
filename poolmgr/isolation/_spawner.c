/* poolmgr-spawn: applies a prepared isolation plan to itself, then execs the engine (same pid).

       poolmgr-spawn KEY=VALUE... -- engine argv...

   The compiled twin of _trampoline.py, which stays the fallback where no C compiler works: the same layers in
   the same order (cgroup, rlimits, bounding set, ambient set, groups/gid/uid, chdir, capset, no_new_privs,
   Landlock, seccomp, exec with the trampoline's PATH lookup) and the same failure contract. A step the plan
   asks for that fails writes one line `poolmgr-isolation: <layer>: <reason>` to stderr and exits 126: the
   engine is never exec'd half-protected. A plan it cannot read is layer `plan`, a failed exec exits 127.
   _spawner.py's plan_argv() writes the tokens; the order of the tokens does not matter:

       cgroup=PATH                  write "0" (ourselves) to this file: v1 tasks, v2 cgroup.procs (repeatable)
       rlimit=RES,SOFT,HARD         setrlimit; -1 is RLIM_INFINITY (repeatable)
       bounding=1                   drop the whole capability bounding set
       caps=1                       clear the ambient set, and after the user switch every other set
       uid=N gid=N                  setgroups({}), setresgid, setresuid (both or neither)
       workdir=PATH                 chdir
       nnp=1                        PR_SET_NO_NEW_PRIVS
       landlock=ABI,FS,NET,SCOPED   a Landlock ruleset handling these rights, with...
       llpath=ALLOWED,PATH          ...this path-beneath rule (repeatable; PATH is everything after the comma)
       seccomp=HEX                  a classic BPF program (struct sock_filter[]), loaded with PR_SET_SECCOMP

   Only libc and Linux headers: it runs as root between fork and the engine's exec, on every (re)start. A change
   here is a change to _trampoline.py too (tests/isolation/test_trampoline.py runs its cases against both). */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef __NR_landlock_create_ruleset /* the same number on every architecture (new-style numbering) */
#define __NR_landlock_create_ruleset 444
#define __NR_landlock_add_rule 445
#define __NR_landlock_restrict_self 446
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

#define EXIT_ISOLATION_FAILED 126
#define EXIT_EXEC_FAILED 127
#define LANDLOCK_RULE_PATH_BENEATH 1
#define DEFAULT_PATH "/usr/bin:/bin"
#define DEFAULT_CAP_LAST_CAP 40

extern char **environ;

/* Our own copies of the kernel's structs: older headers lack the later fields. */
struct ll_ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};

struct ll_path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

struct rlimit_step {
    int resource;
    struct rlimit limit;
};

struct ll_path {
    uint64_t allowed;
    const char *path;
};

struct plan {
    const char **cgroups;
    int n_cgroups;
    struct rlimit_step *rlimits;
    int n_rlimits;
    int bounding, caps, nnp;
    int has_uid, has_gid;
    uid_t uid;
    gid_t gid;
    const char *workdir;
    int landlock;
    uint64_t ll_abi, ll_fs, ll_net, ll_scoped;
    struct ll_path *paths;
    int n_paths;
    unsigned char *bpf;
    size_t bpf_len;
};

/* ---- failing: one line on stderr, then exit -------------------------------------------------------------- */

static void fail(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));

static void fail(int code, const char *fmt, ...)
{
    char line[4096];
    int head = snprintf(line, sizeof line, "poolmgr-isolation: ");
    va_list ap;
    va_start(ap, fmt);
    int body = vsnprintf(line + head, sizeof line - (size_t)head, fmt, ap);
    va_end(ap);
    size_t len = (size_t)head + (body > 0 ? (size_t)body : 0);
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    line[len++] = '\n';
    ssize_t ignored = write(STDERR_FILENO, line, len);
    (void)ignored;
    _exit(code);
}

/* A layer's system call failed: `<layer>: <what>: <strerror> (errno N)`, as the trampoline's _oserror. */
static void fail_errno(const char *layer, const char *what) __attribute__((noreturn));

static void fail_errno(const char *layer, const char *what)
{
    int err = errno;
    fail(EXIT_ISOLATION_FAILED, "%s: %s: %s (errno %d)", layer, what, strerror(err), err);
}

static void fail_plan(const char *token, const char *why) __attribute__((noreturn));

static void fail_plan(const char *token, const char *why)
{
    fail(EXIT_ISOLATION_FAILED, "plan: %.200s: %s", token, why);
}

/* ---- parsing the plan ----------------------------------------------------------------------------------- */

/* A decimal number at `s`; the character after it, or NULL when there is none or it overflows. */
static const char *parse_u64(const char *s, uint64_t *out)
{
    uint64_t value = 0;
    if (*s < '0' || *s > '9')
        return NULL;
    for (; *s >= '0' && *s <= '9'; s++) {
        uint64_t digit = (uint64_t)(*s - '0');
        if (value > (UINT64_MAX - digit) / 10)
            return NULL;
        value = value * 10 + digit;
    }
    *out = value;
    return s;
}

/* An rlimit value as the plan writes it: decimal, or -1 for RLIM_INFINITY (Python's resource.RLIM_INFINITY). */
static const char *parse_rlim(const char *s, rlim_t *out)
{
    uint64_t value = 0;
    if (strncmp(s, "-1", 2) == 0) {
        *out = RLIM_INFINITY;
        return s + 2;
    }
    s = parse_u64(s, &value);
    *out = (rlim_t)value;
    return s;
}

/* `count` decimal numbers separated by commas; what follows the last one, or NULL. */
static const char *parse_numbers(const char *s, uint64_t *out, int count)
{
    for (int i = 0; i < count; i++) {
        if (i > 0 && *s++ != ',')
            return NULL;
        if (!(s = parse_u64(s, &out[i])))
            return NULL;
    }
    return s;
}

static int parse_id(const char *s, uint32_t *out)
{
    uint64_t value;
    const char *end = parse_u64(s, &value);
    if (!end || *end || value >= UINT32_MAX) /* (uid_t)-1 would mean "leave unchanged" */
        return -1;
    *out = (uint32_t)value;
    return 0;
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int parse_hex(const char *s, unsigned char **out, size_t *len)
{
    size_t n = strlen(s);
    if (n == 0 || n % 2)
        return -1;
    unsigned char *buf = malloc(n / 2);
    if (!buf)
        fail(EXIT_ISOLATION_FAILED, "internal: out of memory");
    for (size_t i = 0; i < n / 2; i++) {
        int hi = hex_digit(s[2 * i]), lo = hex_digit(s[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            free(buf);
            return -1;
        }
        buf[i] = (unsigned char)(hi << 4 | lo);
    }
    *out = buf;
    *len = n / 2;
    return 0;
}

static void parse_flag(int *flag, const char *token, const char *value)
{
    if (strcmp(value, "1") != 0 && strcmp(value, "0") != 0)
        fail_plan(token, "want 1 or 0");
    *flag = value[0] == '1';
}

static void parse_rlimit(struct plan *p, const char *token, const char *value)
{
    uint64_t resource;
    struct rlimit_step *step = &p->rlimits[p->n_rlimits];
    const char *s = parse_u64(value, &resource);
    if (!s || *s++ != ',' || !(s = parse_rlim(s, &step->limit.rlim_cur)) || *s++ != ',' ||
        !(s = parse_rlim(s, &step->limit.rlim_max)) || *s || resource >= RLIM_NLIMITS)
        fail_plan(token, "want RES,SOFT,HARD (decimal; -1 is unlimited)");
    step->resource = (int)resource;
    p->n_rlimits++;
}

static void parse_landlock(struct plan *p, const char *token, const char *value)
{
    uint64_t n[4] = {0};
    const char *end = parse_numbers(value, n, 4);
    if (p->landlock)
        fail_plan(token, "given twice");
    if (!end || *end || n[0] < 1)
        fail_plan(token, "want ABI,FS,NET,SCOPED (decimal, ABI >= 1)");
    p->landlock = 1;
    p->ll_abi = n[0];
    p->ll_fs = n[1];
    p->ll_net = n[2];
    p->ll_scoped = n[3];
}

static void parse_llpath(struct plan *p, const char *token, const char *value)
{
    struct ll_path *rule = &p->paths[p->n_paths];
    const char *s = parse_u64(value, &rule->allowed);
    if (!s || *s != ',' || !s[1])
        fail_plan(token, "want ALLOWED,PATH");
    rule->path = s + 1;
    p->n_paths++;
}

static void parse_cgroup(struct plan *p, const char *token, const char *value)
{
    if (!*value)
        fail_plan(token, "empty value");
    p->cgroups[p->n_cgroups++] = value;
}

static void parse_once(const char **slot, const char *token, const char *value)
{
    if (*slot)
        fail_plan(token, "given twice");
    if (!*value)
        fail_plan(token, "empty value");
    *slot = value;
}

static void parse_ids(struct plan *p, const char *key, const char *token, const char *value)
{
    int is_uid = strcmp(key, "uid") == 0;
    int *has = is_uid ? &p->has_uid : &p->has_gid;
    uint32_t id;
    if (*has)
        fail_plan(token, "given twice");
    if (parse_id(value, &id) < 0)
        fail_plan(token, "want a decimal id below 4294967295");
    *has = 1;
    if (is_uid)
        p->uid = (uid_t)id;
    else
        p->gid = (gid_t)id;
}

static void parse_seccomp(struct plan *p, const char *token, const char *value)
{
    if (p->bpf)
        fail_plan(token, "given twice");
    if (parse_hex(value, &p->bpf, &p->bpf_len) < 0)
        fail_plan(token, "want the BPF program as an even number of hex digits");
}

static void parse_token(struct plan *p, const char *token)
{
    const char *eq = strchr(token, '=');
    if (!eq || eq == token)
        fail_plan(token, "want KEY=VALUE");
    char key[16];
    size_t key_len = (size_t)(eq - token);
    if (key_len >= sizeof key)
        fail_plan(token, "unknown key");
    memcpy(key, token, key_len);
    key[key_len] = '\0';
    const char *value = eq + 1;
    if (strcmp(key, "cgroup") == 0)
        parse_cgroup(p, token, value);
    else if (strcmp(key, "rlimit") == 0)
        parse_rlimit(p, token, value);
    else if (strcmp(key, "bounding") == 0)
        parse_flag(&p->bounding, token, value);
    else if (strcmp(key, "caps") == 0)
        parse_flag(&p->caps, token, value);
    else if (strcmp(key, "nnp") == 0)
        parse_flag(&p->nnp, token, value);
    else if (strcmp(key, "uid") == 0 || strcmp(key, "gid") == 0)
        parse_ids(p, key, token, value);
    else if (strcmp(key, "workdir") == 0)
        parse_once(&p->workdir, token, value);
    else if (strcmp(key, "landlock") == 0)
        parse_landlock(p, token, value);
    else if (strcmp(key, "llpath") == 0)
        parse_llpath(p, token, value);
    else if (strcmp(key, "seccomp") == 0)
        parse_seccomp(p, token, value);
    else
        fail_plan(token, "unknown key");
}

/* The tokens argv[1..sep-1]; every repeatable list is sized for all of them. */
static void parse_plan(struct plan *p, int sep, char **argv)
{
    size_t n = (size_t)sep;
    memset(p, 0, sizeof *p);
    p->cgroups = calloc(n, sizeof *p->cgroups);
    p->rlimits = calloc(n, sizeof *p->rlimits);
    p->paths = calloc(n, sizeof *p->paths);
    if (!p->cgroups || !p->rlimits || !p->paths)
        fail(EXIT_ISOLATION_FAILED, "internal: out of memory");
    for (int i = 1; i < sep; i++)
        parse_token(p, argv[i]);
    if (p->has_uid != p->has_gid)
        fail(EXIT_ISOLATION_FAILED, "plan: uid and gid go together");
    if (p->n_paths && !p->landlock)
        fail(EXIT_ISOLATION_FAILED, "plan: llpath without landlock");
}

/* ---- the layers, in order ------------------------------------------------------------------------------- */

/* "0" is the writer itself; on v1 the plan names `tasks`, which moves this (only) thread without the kernel's
   global threadgroup lock and its RCU grace period (see poolmgr/isolation/_cgroup.py). */
static void join_cgroups(const struct plan *p)
{
    for (int i = 0; i < p->n_cgroups; i++) {
        int fd = open(p->cgroups[i], O_WRONLY | O_CLOEXEC);
        ssize_t written = fd < 0 ? -1 : write(fd, "0", 1);
        if (written == 0)
            errno = EIO;
        if (written != 1)
            fail(EXIT_ISOLATION_FAILED, "cgroup: %s: %s", p->cgroups[i], strerror(errno));
        close(fd);
    }
}

static void set_rlimits(const struct plan *p)
{
    for (int i = 0; i < p->n_rlimits; i++) {
        const struct rlimit_step *step = &p->rlimits[i];
        if (setrlimit(step->resource, &step->limit) < 0) {
            int err = errno;
            fail(EXIT_ISOLATION_FAILED, "rlimits: resource %d to (%lld, %lld): %s (errno %d)", step->resource,
                 (long long)step->limit.rlim_cur, (long long)step->limit.rlim_max, strerror(err), err);
        }
    }
}

static int cap_last_cap(void)
{
    char buf[16] = {0};
    int fd = open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return DEFAULT_CAP_LAST_CAP;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    uint64_t value;
    if (n <= 0 || !parse_u64(buf, &value) || value > 63)
        return DEFAULT_CAP_LAST_CAP;
    return (int)value;
}

static void drop_bounding_set(void)
{
    int last = cap_last_cap();
    for (int cap = 0; cap <= last; cap++) {
        if (prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 1 && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0) {
            char what[32];
            snprintf(what, sizeof what, "PR_CAPBSET_DROP cap %d", cap);
            fail_errno("bounding-set", what);
        }
    }
}

static void clear_ambient(void)
{
    /* EINVAL: kernel < 4.3 has no ambient set */
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        fail_errno("ambient-caps", "PR_CAP_AMBIENT_CLEAR_ALL");
}

static void switch_user(uid_t uid, gid_t gid)
{
    uid_t ru, eu, su;
    gid_t rg, eg, sg;
    if (setgroups(0, NULL) < 0 || setresgid(gid, gid, gid) < 0 || setresuid(uid, uid, uid) < 0)
        fail(EXIT_ISOLATION_FAILED, "user: to uid %u gid %u: %s", (unsigned)uid, (unsigned)gid, strerror(errno));
    if (getresuid(&ru, &eu, &su) < 0 || getresgid(&rg, &eg, &sg) < 0 || ru != uid || eu != uid || su != uid ||
        rg != gid || eg != gid || sg != gid || getgroups(0, NULL) != 0)
        fail(EXIT_ISOLATION_FAILED, "user: to uid %u gid %u: ids did not stick", (unsigned)uid, (unsigned)gid);
}

static void change_dir(const char *workdir)
{
    if (chdir(workdir) < 0)
        fail(EXIT_ISOLATION_FAILED, "workdir: %s", strerror(errno));
}

static void clear_capabilities(void)
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capset, &header, data) < 0)
        fail_errno("capabilities", "capset");
}

static void set_no_new_privs(void)
{
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        fail_errno("no_new_privs", "PR_SET_NO_NEW_PRIVS");
}

static void landlock_path_rule(int ruleset, const struct ll_path *rule)
{
    char what[4200];
    int fd = open(rule->path, O_PATH | O_CLOEXEC);
    if (fd < 0)
        fail(EXIT_ISOLATION_FAILED, "landlock: open %s: %s", rule->path, strerror(errno));
    struct ll_path_beneath_attr attr = {rule->allowed, fd};
    if (syscall(__NR_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &attr, 0) < 0) {
        snprintf(what, sizeof what, "add_rule %s", rule->path);
        fail_errno("landlock", what);
    }
    close(fd);
}

/* Path rules only: the net rights the plan handles get no rule, so no TCP port is allowed at all. */
static void apply_landlock(const struct plan *p)
{
    struct ll_ruleset_attr attr = {p->ll_fs, p->ll_net, p->ll_scoped};
    size_t size = p->ll_abi < 4 ? 8 : p->ll_abi < 6 ? 16 : 24; /* the fields the kernel's ABI knows */
    long ruleset = syscall(__NR_landlock_create_ruleset, &attr, size, 0);
    if (ruleset < 0)
        fail_errno("landlock", "create_ruleset");
    for (int i = 0; i < p->n_paths; i++)
        landlock_path_rule((int)ruleset, &p->paths[i]);
    if (syscall(__NR_landlock_restrict_self, ruleset, 0) < 0)
        fail_errno("landlock", "restrict_self");
    close((int)ruleset);
}

static void load_seccomp(const struct plan *p)
{
    size_t count = p->bpf_len / sizeof(struct sock_filter);
    if (p->bpf_len % sizeof(struct sock_filter) || count == 0 || count > 0xffff)
        fail(EXIT_ISOLATION_FAILED, "seccomp: bad BPF program of %zu bytes", p->bpf_len);
    struct sock_fprog prog = {(unsigned short)count, (struct sock_filter *)(void *)p->bpf};
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) < 0)
        fail_errno("seccomp", "PR_SET_SECCOMP");
}

static void apply(const struct plan *p)
{
    if (p->n_cgroups)
        join_cgroups(p);
    if (p->n_rlimits)
        set_rlimits(p);
    if (p->bounding)
        drop_bounding_set();
    if (p->caps)
        clear_ambient();
    if (p->has_uid)
        switch_user(p->uid, p->gid);
    if (p->workdir)
        change_dir(p->workdir);
    if (p->caps)
        clear_capabilities();
    if (p->nnp)
        set_no_new_privs();
    if (p->landlock)
        apply_landlock(p);
    if (p->bpf)
        load_seccomp(p);
}

/* ---- exec ----------------------------------------------------------------------------------------------- */

/* The trampoline's find_executable: a name with a slash as is, else the first PATH entry (empty = the current
   directory) where access(X_OK) holds, as the engine user. NULL with errno ENOENT when none. */
static const char *find_executable(const char *name, char *buf, size_t size)
{
    if (strchr(name, '/'))
        return name;
    const char *path = getenv("PATH");
    if (!path)
        path = DEFAULT_PATH;
    for (const char *dir = path;; dir++) {
        size_t len = strcspn(dir, ":");
        int n = len ? snprintf(buf, size, "%.*s/%s", (int)len, dir, name) : snprintf(buf, size, "./%s", name);
        if (n > 0 && (size_t)n < size && access(buf, X_OK) == 0)
            return buf;
        dir += len;
        if (!*dir)
            break;
    }
    errno = ENOENT;
    return NULL;
}

static void exec_engine(char **argv) __attribute__((noreturn));

static void exec_engine(char **argv)
{
    static char found[8192];
    const char *path = find_executable(argv[0], found, sizeof found);
    if (path)
        execve(path, argv, environ);
    fail(EXIT_EXEC_FAILED, "exec: %s: %s", argv[0], strerror(errno));
}

int main(int argc, char **argv)
{
    int sep = 1;
    while (sep < argc && strcmp(argv[sep], "--") != 0)
        sep++;
    if (sep + 1 >= argc)
        fail(EXIT_ISOLATION_FAILED, "usage: poolmgr-spawn KEY=VALUE... -- ARGV...");
    struct plan plan;
    parse_plan(&plan, sep, argv);
    apply(&plan);
    exec_engine(argv + sep + 1);
}
