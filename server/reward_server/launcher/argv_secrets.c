/* Preloaded into tritonserver by reward-server (LD_PRELOAD): puts keys into its command line without
 * `ps` seeing them. Triton 2.51 takes restricted-API keys only as flags, and /proc/PID/cmdline is
 * readable by every local user. The launcher writes a marker, \1REWARD_SECRET_<n>\1, where a key goes
 * and passes the key in the environment variable REWARD_SECRET_<n>. Before Triton's main runs, this
 * replaces each marker with its key in memory of its own (main reads argv[i]; /proc/PID/cmdline keeps
 * showing the marker) and removes the variables and LD_PRELOAD from the environment, so that Triton's
 * children (python-backend stubs) see neither. Without this library a marker stays a key no client can
 * send (\1 is not allowed in HTTP headers nor gRPC metadata): closed, never open. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MARK '\1'
#define PREFIX "REWARD_SECRET_"

/* argument with its first marker at or after `from` replaced by the key; NULL when there is none */
static char *replace_one(const char *argument, size_t from, size_t *next) {
    const char *start = strchr(argument + from, MARK);
    const char *end = start ? strchr(start + 1, MARK) : NULL;
    if (!end || strncmp(start + 1, PREFIX, strlen(PREFIX)) != 0) return NULL;
    char name[64];
    size_t length = (size_t)(end - start - 1);
    if (length >= sizeof name) return NULL;
    memcpy(name, start + 1, length);
    name[length] = '\0';
    const char *value = getenv(name);
    if (!value) {
        fprintf(stderr, "argv_secrets: %s is not set\n", name);
        _exit(2);
    }
    size_t head = (size_t)(start - argument);
    char *joined = malloc(head + strlen(value) + strlen(end + 1) + 1);
    if (!joined) _exit(2);
    memcpy(joined, argument, head);
    strcpy(joined + head, value);
    strcat(joined, end + 1);
    *next = head + strlen(value); /* never scan a key itself */
    return joined;
}

static void put_secrets(int argc, char **argv, char **envp) {
    (void)envp;
    for (int i = 1; i < argc; i++) {
        size_t from = 0;
        char *joined;
        while ((joined = replace_one(argv[i], from, &from)) != NULL) argv[i] = joined; /* earlier copies are kept: argv owns them */
    }
    /* Then out of the environment (a key may serve several flags), with this library. */
    for (int n = 0; n < 100; n++) {
        char name[64];
        snprintf(name, sizeof name, PREFIX "%d", n);
        unsetenv(name);
    }
    unsetenv("LD_PRELOAD");
}

/* glibc calls .init_array functions with main's argc, argv and envp, before main. */
__attribute__((section(".init_array"), used)) static void (*const run_put_secrets)(int, char **, char **) = put_secrets;
