"""The encrypted prediction service: HTTP front ends of the inference parties, and the client."""
