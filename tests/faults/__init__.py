"""Issue 9: fault injection with a ledger of every event, hostile input, the admin surface and log redaction.

harness.py      ledger, simulated provider, fault-injecting upstream, raw HTTP client, figures (JSON lines)
logcheck.py     every log record of the whole run, checked at the end for configured secrets and body markers
test_faults.py  sidecar / Valkey / upstream faults, figures per fault
test_hostile.py property tests and targeted cases against a running `sidecar run`
test_security.py admin surface, SSRF from request data, the log check itself
report.py       figures JSON lines -> the table in docs/reliability.md
"""
