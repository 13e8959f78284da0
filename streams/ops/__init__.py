"""Operating a cluster: the local KRaft broker, topic admin, the process supervisor, autoscaling."""
