// The smallest JavaScript job: an `xact-plugin` whose `run` does nothing. The
// benchmark compares an empty run of it with the same empty job in Rust and
// Python (what a fresh JavaScript instance costs per run).
export const xactJob = {
  run(_ctx, _tx) {
    return { summary: "noop" };
  },
};
