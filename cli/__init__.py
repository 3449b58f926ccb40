"""The ``fedbiopsy`` command line: one sub-command per task, each importing what it needs when it runs."""
