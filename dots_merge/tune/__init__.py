"""The tune stage: the trial loop over a trial store, samplers, the resident candidate, objectives, the pick."""
