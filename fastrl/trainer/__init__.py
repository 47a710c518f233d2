"""fastrl trainer."""
