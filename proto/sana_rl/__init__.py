"""Generated protocol packages of sana-rl (sources under proto/; see scripts/gen_proto.sh)."""
