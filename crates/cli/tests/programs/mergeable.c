/*
 * An unmodified program for `samepage run`'s tests: it knows nothing of samepage and asks
 * the kernel's interfaces for merging, madvise(MADV_MERGEABLE) or prctl(PR_SET_MEMORY_MERGE).
 *
 *   mergeable madvise|prctl PAGES DISTINCT [SALT]
 *
 * Page i holds 8-byte words all equal to its value: 0 (a zero page) for every fourth page,
 * else 1 + i % DISTINCT (+ SALT << 32), so processes started alike hold the same pages.
 * It prints "ready PID" and then answers one line per command read on stdin:
 *
 *   verify     "verify ok" or "verify bad PAGE"
 *   write K    rewrites every page i with i % K == 1 with a value of its own: "written N"
 *   unmerge    madvise(MADV_UNMERGEABLE) or prctl(PR_SET_MEMORY_MERGE, 0): "unmerged"
 *   get        "get_memory_merge V" (prctl(PR_GET_MEMORY_MERGE))
 *   fork       the child checks its copy ("child PID verify ok|bad ..."), then waits for
 *              "release", checks it again ("child PID verify2 ok|bad ...") and exits;
 *              the parent answers "forked PID"
 *   release    "child exit STATUS"
 *   exec       executes itself again (the new image answers "ready PID" after
 *              "exec get_memory_merge V")
 *   quit       exits 0
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
#endif

static size_t pages;
static uint64_t *expect;
static unsigned char *mem;
static int use_prctl;

static void fill(size_t i, uint64_t v) {
	uint64_t *w = (uint64_t *)(mem + i * 4096);
	expect[i] = v;
	for (size_t j = 0; j < 512; j++)
		w[j] = v;
}

static long check(void) {
	for (size_t i = 0; i < pages; i++) {
		const uint64_t *w = (const uint64_t *)(mem + i * 4096);
		for (size_t j = 0; j < 512; j++)
			if (w[j] != expect[i])
				return (long)i;
	}
	return -1;
}

static void say(const char *fmt, long a, long b) {
	char line[128];
	int n = snprintf(line, sizeof line, fmt, a, b);
	/* One write per line: parent and child share the pipe. */
	if (write(1, line, n) != n)
		_exit(3);
}

static void verdict(const char *what, long pid) {
	long bad = check();
	char fmt[64];
	if (bad < 0) {
		snprintf(fmt, sizeof fmt, "%s ok\n", what);
		say(fmt, 0, 0);
	} else if (pid) {
		snprintf(fmt, sizeof fmt, "child %%ld %s bad %%ld\n", what);
		say(fmt, pid, bad);
	} else {
		snprintf(fmt, sizeof fmt, "%s bad %%ld\n", what);
		say(fmt, bad, 0);
	}
}

int main(int argc, char **argv) {
	if (argc < 4) {
		fprintf(stderr, "usage: %s madvise|prctl PAGES DISTINCT [SALT] [exec]\n", argv[0]);
		return 2;
	}
	use_prctl = strcmp(argv[1], "prctl") == 0;
	pages = strtoul(argv[2], 0, 0);
	uint64_t distinct = strtoul(argv[3], 0, 0);
	uint64_t salt = argc > 4 ? strtoul(argv[4], 0, 0) : 0;
	int execd = argc > 5 && strcmp(argv[5], "exec") == 0;

	if (execd)
		say("exec get_memory_merge %ld\n", prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0), 0);
	else if (use_prctl && prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)) {
		perror("prctl(PR_SET_MEMORY_MERGE)");
		return 1;
	}
	expect = calloc(pages, sizeof *expect);
	if (use_prctl) {
		/* Heap memory mapped after the prctl: it merges too. */
		mem = aligned_alloc(4096, pages * 4096);
		if (!mem)
			return 1;
	} else {
		mem = mmap(0, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (mem == MAP_FAILED)
			return 1;
	}
	for (size_t i = 0; i < pages; i++)
		fill(i, i % 4 == 0 ? 0 : (1 + i % distinct) | (salt << 32));
	if (!use_prctl && madvise(mem, pages * 4096, MADV_MERGEABLE)) {
		perror("madvise(MADV_MERGEABLE)");
		return 1;
	}
	say("ready %ld\n", (long)getpid(), 0);

	int release[2] = {-1, -1};
	pid_t child = 0;
	char cmd[64];
	FILE *in = stdin;
	setvbuf(in, 0, _IONBF, 0);
	while (fgets(cmd, sizeof cmd, in)) {
		if (!strncmp(cmd, "verify", 6)) {
			verdict("verify", 0);
		} else if (!strncmp(cmd, "write ", 6)) {
			long k = strtol(cmd + 6, 0, 0), n = 0;
			for (size_t i = 0; i < pages; i++)
				if (k > 0 && i % k == 1) {
					fill(i, ((uint64_t)getpid() << 32) | (i + 1) | (1ull << 63));
					n++;
				}
			say("written %ld\n", n, 0);
		} else if (!strncmp(cmd, "unmerge", 7)) {
			int r = use_prctl ? prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0)
					  : madvise(mem, pages * 4096, MADV_UNMERGEABLE);
			say(r ? "unmerge failed %ld\n" : "unmerged\n", r, 0);
		} else if (!strncmp(cmd, "get", 3)) {
			say("get_memory_merge %ld\n", prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0), 0);
		} else if (!strncmp(cmd, "fork", 4)) {
			if (pipe(release))
				return 1;
			child = fork();
			if (child < 0)
				return 1;
			if (child == 0) {
				long me = getpid(), bad = check();
				if (bad < 0)
					say("child %ld verify ok\n", me, 0);
				else
					say("child %ld verify bad %ld\n", me, bad);
				char c;
				close(release[1]);
				if (read(release[0], &c, 1) != 1)
					_exit(4);
				bad = check();
				if (bad < 0)
					say("child %ld verify2 ok\n", me, 0);
				else
					say("child %ld verify2 bad %ld\n", me, bad);
				_exit(bad < 0 ? 0 : 1);
			}
			close(release[0]);
			say("forked %ld\n", child, 0);
		} else if (!strncmp(cmd, "release", 7)) {
			int status = -1;
			if (write(release[1], "x", 1) != 1)
				return 1;
			waitpid(child, &status, 0);
			say("child exit %ld\n", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), 0);
		} else if (!strncmp(cmd, "exec", 4)) {
			char *args[] = {argv[0], argv[1], argv[2], argv[3], argc > 4 ? argv[4] : "0", "exec", 0};
			execv("/proc/self/exe", args);
			return 5;
		} else if (!strncmp(cmd, "quit", 4)) {
			return 0;
		}
	}
	return 0;
}
