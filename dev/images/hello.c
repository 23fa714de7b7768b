/* The demo's web server image: answers every HTTP request with one line naming the pod
 * ("hello from <hostname> (<address it was reached on>)"), one thread per connection.
 * Listens on $PORT (default 8080). Static, no libc beyond glibc's static archive. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char host[256];

static void *serve(void *arg) {
  int fd = (int)(long)arg;
  char buf[4096], addr[INET6_ADDRSTRLEN] = "?", body[512], resp[1024];
  struct sockaddr_storage local;
  socklen_t len = sizeof local;
  size_t got = 0;
  /* read until the end of the request headers (or 4 KiB, or the client closes) */
  while (got < sizeof buf - 1) {
    ssize_t n = read(fd, buf + got, sizeof buf - 1 - got);
    if (n <= 0) break;
    got += (size_t)n;
    buf[got] = 0;
    if (strstr(buf, "\r\n\r\n") || strstr(buf, "\n\n")) break;
  }
  if (getsockname(fd, (struct sockaddr *)&local, &len) == 0) {
    if (local.ss_family == AF_INET)
      inet_ntop(AF_INET, &((struct sockaddr_in *)&local)->sin_addr, addr, sizeof addr);
    else
      inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&local)->sin6_addr, addr, sizeof addr);
  }
  int blen = snprintf(body, sizeof body, "hello from %s (%s)\n", host, addr);
  int rlen = snprintf(resp, sizeof resp,
                      "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                      "Connection: close\r\n\r\n%s", blen, body);
  ssize_t off = 0;
  while (off < rlen) {
    ssize_t n = write(fd, resp + off, (size_t)(rlen - off));
    if (n <= 0) break;
    off += n;
  }
  close(fd);
  return NULL;
}

static void stop(int sig) { (void)sig; _exit(0); }

int main(void) {
  const char *port = getenv("PORT");
  int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sa;
  signal(SIGTERM, stop);
  signal(SIGPIPE, SIG_IGN);
  gethostname(host, sizeof host - 1);
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port ? (unsigned short)atoi(port) : 8080);
  sa.sin_addr.s_addr = htonl(INADDR_ANY);
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 512) < 0) {
    perror("hello: listen");
    return 1;
  }
  for (;;) {
    int c = accept(fd, NULL, NULL);
    if (c < 0) continue;
    pthread_t t;
    if (pthread_create(&t, NULL, serve, (void *)(long)c) != 0) { close(c); continue; }
    pthread_detach(t);
  }
}
