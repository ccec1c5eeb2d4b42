// SPDX-License-Identifier: MIT
/*
 * tcp_keys: what the guest kernel's TCP keys make of one fixed 4-tuple, for
 * the kernel-secrets clone test (tests/test_ksecrets_clone.py).
 *
 *   tcp_keys sample LPORT SPORT N
 *     listens on 127.0.0.1:LPORT and N times connects to it from
 *     127.0.0.1:SPORT, printing one line each:
 *       KEYS ISN TSOFF
 *     ISN: the initial sequence number minus (CLOCK_REALTIME ns >> 6), what
 *     the kernel adds to the siphash of the 4-tuple under net_secret: so the
 *     part net_secret decides, give or take the time connect() takes.
 *     TSOFF: the connection's TCP timestamp minus CLOCK_MONOTONIC in ms, the
 *     offset siphash gives the address pair under ts_secret (give or take 1).
 *     The ISN is read right after connect(), before anything is sent: in
 *     TCP_REPAIR mode, TCP_QUEUE_SEQ of the send queue is write_seq = ISN + 1.
 *     Each connection ends with a reset (SO_LINGER 0), so no TIME_WAIT keeps
 *     the 4-tuple from the next one.
 *
 *   tcp_keys pair PORT
 *     an established connection over 127.0.0.1:PORT; prints "PAIR READY",
 *     then on every SIGUSR1 sends a line each way and prints
 *     "ECHO ok N" (or "ECHO FAIL ..." with errno): a connection opened before
 *     a snapshot must carry on in every clone, whatever keys it was given.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
	fprintf(stderr, "tcp_keys: %s: %s\n", what, strerror(errno));
	exit(1);
}

static struct sockaddr_in loopback(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

static int sock(void)
{
	int one = 1, s = socket(AF_INET, SOCK_STREAM, 0);

	if (s < 0 || setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)))
		die("socket");
	return s;
}

static int listener(int port)
{
	struct sockaddr_in a = loopback(port);
	int s = sock();

	if (bind(s, (struct sockaddr *)&a, sizeof(a)) || listen(s, 8))
		die("listen");
	return s;
}

static uint64_t now_ns(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static int sample(int lport, int sport, int n)
{
	int l = listener(lport), i;

	for (i = 0; i < n; i++) {
		struct sockaddr_in src = loopback(sport), dst = loopback(lport);
		int c = sock(), a, on = 1, off = 0, q = TCP_SEND_QUEUE;
		struct linger lin = { .l_onoff = 1, .l_linger = 0 };
		uint32_t seq, ts;
		socklen_t len = sizeof(seq);
		uint64_t t;

		if (bind(c, (struct sockaddr *)&src, sizeof(src)))
			die("bind the source port");
		t = now_ns(CLOCK_REALTIME);
		if (connect(c, (struct sockaddr *)&dst, sizeof(dst)))
			die("connect");
		if (setsockopt(c, IPPROTO_TCP, TCP_REPAIR, &on, sizeof(on)) ||
		    setsockopt(c, IPPROTO_TCP, TCP_REPAIR_QUEUE, &q, sizeof(q)) ||
		    getsockopt(c, IPPROTO_TCP, TCP_QUEUE_SEQ, &seq, &len) ||
		    setsockopt(c, IPPROTO_TCP, TCP_REPAIR, &off, sizeof(off)))
			die("TCP_REPAIR");
		len = sizeof(ts);
		if (getsockopt(c, IPPROTO_TCP, TCP_TIMESTAMP, &ts, &len))
			die("TCP_TIMESTAMP");
		printf("KEYS %u %u\n", (uint32_t)(seq - 1 - (uint32_t)(t >> 6)),
		       (uint32_t)(ts - (uint32_t)(now_ns(CLOCK_MONOTONIC) / 1000000)));
		a = accept(l, NULL, NULL);
		if (a < 0 || setsockopt(c, SOL_SOCKET, SO_LINGER, &lin, sizeof(lin)))
			die("accept");
		close(c);
		close(a);
	}
	close(l);
	return 0;
}

static int round_trip(int from, int to, int k)
{
	char out[32], in[32];
	int len = snprintf(out, sizeof(out), "ping %d\n", k);

	if (write(from, out, len) != len || read(to, in, sizeof(in)) != len)
		return -1;
	return memcmp(in, out, len) ? -1 : 0;
}

static int pair(int port)
{
	struct sockaddr_in dst = loopback(port);
	int l = listener(port), c = sock(), a, k, sig;
	sigset_t set;

	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_BLOCK, &set, NULL);
	if (connect(c, (struct sockaddr *)&dst, sizeof(dst)))
		die("connect");
	a = accept(l, NULL, NULL);
	if (a < 0)
		die("accept");
	close(l);
	printf("PAIR READY\n");
	fflush(stdout);
	for (k = 1; !sigwait(&set, &sig); k++) {
		errno = 0;
		if (round_trip(c, a, k) || round_trip(a, c, k))
			printf("ECHO FAIL %d %s\n", k, strerror(errno));
		else
			printf("ECHO ok %d\n", k);
		fflush(stdout);
	}
	return 1;
}

int main(int argc, char **argv)
{
	if (argc == 5 && !strcmp(argv[1], "sample"))
		return sample(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
	if (argc == 3 && !strcmp(argv[1], "pair"))
		return pair(atoi(argv[2]));
	fprintf(stderr, "usage: tcp_keys sample LPORT SPORT N | tcp_keys pair PORT\n");
	return 2;
}
