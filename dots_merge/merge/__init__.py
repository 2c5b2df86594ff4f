"""The merge stage: the `dots` mergekit method, planning, the global-rescale pre-pass, the streamed writer."""
