/* For benches/wrk-publish.sh only: preloaded into Herald, turns fdatasync into a no-op,
 * to measure what Herald's power-safe sync of sled's log costs. Never for real use. */
int fdatasync(int fd) {
  (void)fd;
  return 0;
}
