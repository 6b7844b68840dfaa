/* LD_PRELOAD shim for tests: after every bind() of a Unix socket to a path, appends
 * "<octal mode> <path>" of the file just created to $KVS_BINDMODE_OUT. This is the mode
 * the socket had the instant it appeared, before anything could chmod it: a daemon that
 * creates its socket open and narrows it afterwards leaves a window that this shows
 * (test_daemon_cli.py, issue 10 fault 7). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    int (*real)(int, const struct sockaddr *, socklen_t) =
        (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    int rc = real(fd, addr, len);
    const char *out = getenv("KVS_BINDMODE_OUT");
    if (rc == 0 && out && addr->sa_family == AF_UNIX) {
        const struct sockaddr_un *un = (const struct sockaddr_un *)addr;
        struct stat st;
        if (un->sun_path[0] && stat(un->sun_path, &st) == 0) {
            FILE *f = fopen(out, "a");
            if (f) {
                fprintf(f, "%o %s\n", (unsigned)(st.st_mode & 07777), un->sun_path);
                fclose(f);
            }
        }
    }
    return rc;
}
