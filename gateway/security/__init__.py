"""Node identity and the one guard around every route (issue 6 §1, §3; R-SE-16).

* :mod:`.tokens` — EdDSA (Ed25519) JWT access tokens: signing keys named by ``kid``, rotation
  (current + previous keys), JWKS, verification of signature, expiry, audience, issuer, type.
* :mod:`.clients` — the OAuth 2.0 client-credentials registry (secrets generated, shown once,
  stored as argon2id hashes) and the token endpoint ``POST /oauth/token``.
* :mod:`.guard` — the ASGI middleware that authenticates every request and checks the scope the
  route needs, from one table.
* :mod:`.credentials` — the other side: how this node obtains and refreshes tokens to call a peer.
* :mod:`.node` — a role's security, assembled from its ``[security]`` config section.

Users, passwords, MFA, roles and the permission table (issue 6 §2–3) plug in at
:class:`.guard.Principal` and :func:`.guard.required_scope`; they are not built yet.
"""
