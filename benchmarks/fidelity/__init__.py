"""How far the simulator is from the GPU, setting by setting.

``rows``: settings, the trial specs a study would build for them, and the
rows file the GPU script writes; ``compare``: errors, verdicts and knob
directions; ``score``: the simulator beside the GPU rows.
"""
