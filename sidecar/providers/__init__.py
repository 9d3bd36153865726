"""Inbound signature verification: pure functions of (method, body, headers, url, now, secrets), no I/O.

base.py              the interface: Inbound, Verified, Handshake, Verifier, the errors (fixed)
registry.py          build_verifier(provider, secrets, tolerance, signature) -> Verifier; PROVIDERS
spec.py              SigSpec (providers.md §23.1) and its validation (§23.5)
engine.py            the generic engine (§23.2) that runs a SigSpec; Switch for two schemes on one route
table.py             the providers that are one SigSpec row each (Stripe, Slack, Paddle, … §23.3)
standardwebhooks.py  Standard Webhooks / Svix / Clerk / Resend (whsec_ HMAC and whpk_ Ed25519 keys)
twilio.py            URL + sorted form parameters, bodySHA256, with/without default port
hubspot.py           v3: selective URL decoding, the SDK's timestamp rule
mailgun.py           the signature in the body (JSON or form), over timestamp + token
discord.py           Ed25519 with hex public keys
sendgrid.py          ECDSA P-256 with a base64 SPKI public key
handshakes.py        Slack, Discord, Zoom, X answers (§24)
crypto.py            keys decoded at config load; constant-time comparison
request.py           strict header access, body parsed at most once
"""
