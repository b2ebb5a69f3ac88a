/*
 * ubshim.c: LD_PRELOAD interposer for pluto's libunbound (test use only).
 *
 * libunbound answers the RFC 6303 / AS112 zones itself, empty: among them the reverse zones of
 * the documentation prefixes (2.0.192.in-addr.arpa., 8.b.d.0.1.0.0.2.ip6.arpa.), so pluto's
 * IPSECKEY lookups for test addresses never reach the test's DNS server, and pluto has no
 * option to change that. pluto configures its context with ub_ctx_resolvconf(); this wrapper
 * calls the real one, then turns those local zones off (unbound.conf: unblock-lan-zones).
 * Built by tools/install-deps.sh into tools/.cache/ubshim.so; needs gcc and libc6-dev only
 * (the two libunbound functions are declared here, resolved at run time in pluto).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>

struct ub_ctx;
int ub_ctx_set_option(struct ub_ctx *ctx, const char *opt, const char *val);

typedef int (*resolvconf_fn)(struct ub_ctx *, const char *);

int ub_ctx_resolvconf(struct ub_ctx *ctx, const char *fname)
{
	resolvconf_fn next = (resolvconf_fn)dlsym(RTLD_NEXT, "ub_ctx_resolvconf");
	int rc;

	if (next == NULL) {
		fprintf(stderr, "ubshim: no ub_ctx_resolvconf after the shim\n");
		return -1;
	}
	rc = next(ctx, fname);
	fprintf(stderr, "ubshim: unblock-lan-zones -> %d\n",
		ub_ctx_set_option(ctx, "unblock-lan-zones:", "yes"));
	return rc;
}
