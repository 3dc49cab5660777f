"""Capacity planning: a discrete-event model of the step loop over batched pools (``simulate``),
the search for replicas per pool that hold a p95 SLO (``plan``), and its inputs. Pure logic."""
