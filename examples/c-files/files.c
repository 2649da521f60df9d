/*
 * A C plugin for Bulkhead, built with Debian's clang and wasi-libc as a
 * WASIp1 core module; the host adapts it into a component at load.
 *
 *   clang --target=wasm32-wasi --sysroot=/usr -O2 -o c-files.wasm files.c
 *
 * Without arguments it copies /in/input.txt to /out/upper.txt in upper
 * case and prints what it did. With --mode=fill it writes /out/fill.bin
 * until a write fails and prints the errno it got (a full /out is ENOSPC).
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

static int fill(void) {
    static char chunk[65536];
    memset(chunk, 'z', sizeof chunk);
    FILE *f = fopen("/out/fill.bin", "w");
    if (!f) {
        printf("open failed: errno %d\n", errno);
        return 1;
    }
    setvbuf(f, NULL, _IONBF, 0);
    unsigned long written = 0;
    for (;;) {
        size_t n = fwrite(chunk, 1, sizeof chunk, f);
        written += n;
        if (n < sizeof chunk) {
            printf("fill stopped after %lu bytes: errno %d (%s)\n", written, errno,
                   errno == ENOSPC ? "ENOSPC" : strerror(errno));
            return 3;
        }
    }
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--mode=fill") == 0) {
            return fill();
        }
    }
    FILE *in = fopen("/in/input.txt", "r");
    if (!in) {
        perror("cannot open /in/input.txt");
        return 1;
    }
    FILE *out = fopen("/out/upper.txt", "w");
    if (!out) {
        perror("cannot create /out/upper.txt");
        return 1;
    }
    long n = 0;
    int c;
    while ((c = fgetc(in)) != EOF) {
        fputc(toupper(c), out);
        n++;
    }
    fclose(out);
    fclose(in);
    printf("c-files upper-cased %ld bytes\n", n);
    return 0;
}
