"""Pure state_dict -> state_dict converters between our adapters and foreign file layouts."""
