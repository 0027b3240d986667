"""SIP (RFC 3261) user agent server, SDP offer/answer (RFC 3264) and SIPREC (RFC 7866)."""
