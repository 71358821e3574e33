"""KFP components, one per stage: `components/<stage>/component.py`. Bodies only import rewardtune and call a stage."""
