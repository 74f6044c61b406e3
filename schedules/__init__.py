"""Hand schedules, one module per variant, each finding blocks by the names its compute definition gives.

Every schedule samples its knobs (``sample_categorical``), so the same function is the variant's default
schedule and a MetaSchedule design space.
"""
