"""memd-to-memd migration of a guest's tmem (issue 14)."""
