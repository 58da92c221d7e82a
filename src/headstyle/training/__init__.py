"""What every trainer shares, below the trainers themselves: signals (a clean stop of the whole command)."""
