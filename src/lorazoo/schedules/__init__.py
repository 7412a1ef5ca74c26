"""schedules parts."""
