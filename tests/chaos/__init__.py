"""Faults under sustained load, end to end: tests/integration/test_chaos.py runs it short, `python
-m bench faults` long.

A receiver on 127.0.0.1 records every delivery with its path and webhook-id. A load generator
commits requests at a steady rate, each with its own path (/hook/<n>) and idempotency key
(evt-<n>, sent as webhook-id), and records n and the request id in a table of its own in the
same transaction, so the database itself says which requests were committed, whatever a fault
did to a COMMIT's answer. While the load runs, in turn: one worker SIGKILLed; PostgreSQL
crashed (`pg_ctl stop -m immediate`) and started; the network between `serve` and PostgreSQL
dropped for a while (a proxy that forwards nothing and keeps every socket open); the whole
`serve` process group SIGKILLed and started again. After each fault it waits until every
request committed before it has a response row (the fault's recovery time).

At the end every committed request must have exactly one response row (200) and the queue be
empty; the receiver must have seen every request, each delivery of n with webhook-id evt-<n>;
the deliveries after a fault beyond the first of each request (duplicates) at most what that
fault had in flight; and no worker's RSS above a warm worker's (one that has had its
--max-inflight requests in flight once) plus a small bound.

Parts: plan (how hard and how long), receiver (the receiving end), load (the load generator and
the workers' memory), run (the faults in turn), report (the verdict). Run
`python tests/chaos/receiver.py --log FILE` to start a receiver by hand.
"""

from .plan import FAULTS, LONG, SHORT, Plan
from .report import Fault, Report
from .run import Chaos

__all__ = ["FAULTS", "LONG", "SHORT", "Chaos", "Fault", "Plan", "Report"]
