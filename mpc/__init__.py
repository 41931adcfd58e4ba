"""The MPC engine: CrypTen compatibility, party processes, launch and transport."""
