/* Connect + 1-byte request/response loop for bench/services.sh: one process
 * that forks an echo server on SERVE_ADDR:SERVE_PORT, then N times connects to
 * ADDR:PORT, sends one byte, reads it back and closes. Nothing else runs in
 * the loop, so the rate is the kernel's cost of one exchange (plus whatever
 * translates it). Prints "rate R ok K failed F".
 * Usage: rr ADDR PORT N SERVE_ADDR SERVE_PORT */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in addr_of(const char *ip, const char *port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(atoi(port)) };

	if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) {
		fprintf(stderr, "rr: bad address %s\n", ip);
		exit(2);
	}
	return sa;
}

int main(int argc, char **argv)
{
	struct sockaddr_in dst, srv;
	struct timespec t0, t1;
	long n, ok = 0, failed = 0;
	int one = 1, lfd;
	pid_t child;

	if (argc != 6) {
		fprintf(stderr, "usage: rr ADDR PORT N SERVE_ADDR SERVE_PORT\n");
		return 2;
	}
	dst = addr_of(argv[1], argv[2]);
	n = atol(argv[3]);
	srv = addr_of(argv[4], argv[5]);
	lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&srv, sizeof(srv)) || listen(lfd, 4096)) {
		perror("rr: serve");
		return 1;
	}
	child = fork();
	if (child == 0) {
		for (;;) {
			char b;
			int c = accept(lfd, NULL, NULL);

			if (c < 0)
				continue;
			if (read(c, &b, 1) == 1)
				(void)!write(c, &b, 1);
			close(c);
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < n; i++) {
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		char b = 'x';

		if (fd >= 0 && !connect(fd, (struct sockaddr *)&dst, sizeof(dst)) &&
		    write(fd, &b, 1) == 1 && read(fd, &b, 1) == 1)
			ok++;
		else
			failed++;
		close(fd);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	kill(child, SIGKILL);
	waitpid(child, NULL, 0);
	printf("rate %.0f ok %ld failed %ld\n",
	       n / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9), ok, failed);
	return 0;
}
