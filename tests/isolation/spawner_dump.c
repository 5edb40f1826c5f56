/* Test harness: _spawner.c's own parser (the very code, #included), printing the plan it read as JSON in the
   shape `prepare` writes (tests/isolation/test_spawner.py compares the two) instead of applying it.

       cc -I poolmgr/isolation -o spawner-dump tests/isolation/spawner_dump.c */

#define main spawner_main
#include "_spawner.c"
#undef main

static void print_string(const char *s)
{
    putchar('"');
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (*c == '"' || *c == '\\')
            printf("\\%c", *c);
        else if (*c < 0x20)
            printf("\\u%04x", *c);
        else
            putchar(*c);
    }
    putchar('"');
}

static void print_rlim(rlim_t value)
{
    if (value == RLIM_INFINITY)
        printf("-1");
    else
        printf("%llu", (unsigned long long)value);
}

static void print_landlock(const struct plan *p)
{
    if (!p->landlock) {
        printf("null");
        return;
    }
    printf("{\"abi\":%llu,\"fs\":%llu,\"net\":%llu,\"scoped\":%llu,\"paths\":[", (unsigned long long)p->ll_abi,
           (unsigned long long)p->ll_fs, (unsigned long long)p->ll_net, (unsigned long long)p->ll_scoped);
    for (int i = 0; i < p->n_paths; i++) {
        printf(i ? ",[" : "[");
        print_string(p->paths[i].path);
        printf(",%llu]", (unsigned long long)p->paths[i].allowed);
    }
    printf("]}");
}

int main(int argc, char **argv)
{
    struct plan p;
    int sep = 1;
    while (sep < argc && strcmp(argv[sep], "--") != 0)
        sep++;
    parse_plan(&p, sep, argv);
    printf("{\"cgroups\":[");
    for (int i = 0; i < p.n_cgroups; i++) {
        printf(i ? "," : "");
        print_string(p.cgroups[i]);
    }
    printf("],\"rlimits\":[");
    for (int i = 0; i < p.n_rlimits; i++) {
        printf(i ? ",[%d," : "[%d,", p.rlimits[i].resource);
        print_rlim(p.rlimits[i].limit.rlim_cur);
        putchar(',');
        print_rlim(p.rlimits[i].limit.rlim_max);
        putchar(']');
    }
    printf("],\"bounding\":%s,\"caps\":%s,\"nnp\":%s,", p.bounding ? "true" : "false", p.caps ? "true" : "false",
           p.nnp ? "true" : "false");
    printf(p.has_uid ? "\"uid\":%u,\"gid\":%u," : "\"uid\":null,\"gid\":null,", (unsigned)p.uid, (unsigned)p.gid);
    printf("\"workdir\":");
    p.workdir ? print_string(p.workdir) : (void)printf("null");
    printf(",\"landlock\":");
    print_landlock(&p);
    printf(",\"seccomp\":");
    if (p.bpf) {
        putchar('"');
        for (size_t i = 0; i < p.bpf_len; i++)
            printf("%02x", p.bpf[i]);
        putchar('"');
    } else {
        printf("null");
    }
    printf("}\n");
    return 0;
}
