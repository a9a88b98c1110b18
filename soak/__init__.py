"""The soak and fault suite (issue 8): real relays, verified traffic, injected faults, figures."""
