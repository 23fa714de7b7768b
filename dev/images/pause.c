/* The rig's sandbox ("pause") image: holds a pod's namespaces open and exits on SIGTERM/SIGINT. */
#include <signal.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

int main(void) {
  signal(SIGTERM, stop);
  signal(SIGINT, stop);
  for (;;) pause();
}
