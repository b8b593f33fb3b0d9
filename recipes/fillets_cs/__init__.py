"""Czech recordings of Fish Fillets NG (real speech, GPL-2)."""
