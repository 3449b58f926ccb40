"""The hospital: site policy, preprocessing, features, local training and the site half of each protocol."""
