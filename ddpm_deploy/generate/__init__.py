"""Offline bulk generation: the job folder (`job`: spec, shards, resume, check) and its Ray driver (`ray_driver`)."""
