// SPDX-License-Identifier: MIT
/*
 * LD_PRELOAD shim for Debian's rasdaemon in rasvmm's rasdaemon guest image.
 *
 * rasdaemon (0.8.3, and 0.8.5 still) opens each trace event it knows
 * through open_trace(), which first polls access() on the event's format
 * file in its tracing instance once a millisecond for up to 30 s, so that a
 * freshly created instance has time to fill in. An event the kernel does
 * not have at all never appears, and each costs the full 30 s: rasvmm's
 * small guest kernels lack PCIe AER, extlog, networking, the block layer
 * and CXL, about a dozen events, so rasdaemon would listen only after six
 * minutes.
 *
 * This shim answers at once for exactly those files: an access() to
 * <tracing>/instances/rasdaemon/events/<group>/<event>/format fails with
 * ENOENT without a system call when <tracing>/events/<group>/<event> does
 * not exist (the kernel has no such event), and the usleep() of the same
 * poll returns at once. Every other call, and every event the kernel has,
 * goes to the C library unchanged.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <string.h>
#include <unistd.h>

static const char instance[] = "/instances/rasdaemon/events/";
/* Per thread: rasdaemon's per-CPU threads may open events too. */
static __thread char missing[PATH_MAX];
static __thread int skip_sleep;

static int (*real_access)(const char *, int);
static int (*real_usleep)(useconds_t);

/* Resolved before main(); without them every call fails as ENOSYS. */
__attribute__((constructor)) static void resolve(void)
{
	real_access = (int (*)(const char *, int))dlsym(RTLD_NEXT, "access");
	real_usleep = (int (*)(useconds_t))dlsym(RTLD_NEXT, "usleep");
}

/* Whether the kernel has the event whose instance format file is path. */
static int kernel_has_event(const char *path, const char *at)
{
	char global[PATH_MAX];
	size_t head = at - path;
	const char *rest = at + strlen("/instances/rasdaemon");
	const char *slash;

	if (head + strlen(rest) >= sizeof(global))
		return 1;
	memcpy(global, path, head);
	strcpy(global + head, rest);
	/* Drop the trailing "/format": the event's directory. */
	slash = strrchr(global, '/');
	if (!slash || strcmp(slash, "/format"))
		return 1;
	global[slash - global] = '\0';
	return real_access(global, F_OK) == 0;
}

int access(const char *path, int mode)
{
	const char *at;
	int r;

	if (!real_access) {
		errno = ENOSYS;
		return -1;
	}
	skip_sleep = 0;
	if (missing[0] && !strcmp(path, missing)) {
		skip_sleep = 1;
		errno = ENOENT;
		return -1;
	}
	r = real_access(path, mode);
	at = strstr(path, instance);
	if (r && errno == ENOENT && at && strlen(path) < sizeof(missing) &&
	    !kernel_has_event(path, at)) {
		strcpy(missing, path);
		skip_sleep = 1;
		errno = ENOENT;
	}
	return r;
}

int usleep(useconds_t usec)
{
	if (skip_sleep) {
		skip_sleep = 0;
		return 0;
	}
	if (!real_usleep) {
		errno = ENOSYS;
		return -1;
	}
	return real_usleep(usec);
}
