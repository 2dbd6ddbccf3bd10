"""Pictures of attention: rollout math and matplotlib drawings."""
