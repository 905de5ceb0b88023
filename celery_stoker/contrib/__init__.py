"""Ready-made Stokers for common leader-only jobs; ``contrib.beat`` runs beat on the leader."""
