"""The demo tutoring site and `tutorgate demo`."""
