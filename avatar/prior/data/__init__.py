"""Data files of the head prior (``anny_landmarks.json``) and the script that makes them."""
