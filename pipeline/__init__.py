"""framelabel's streaming pipeline: source → sampler → encoder → annotator → publisher."""
