"""Real photos into PanoHead: face detection and 68 landmarks (dlib), head pose from the landmarks,
PanoHead's 512 px crop with its 25-vector camera label, and the projector (W / W+ and pivotal tuning).

Data flow: photo --detect--> faces (box, 68 landmarks) --align (quad, pose, re-centre, crop)-->
crop + camera --project--> ws (1, num_ws, w_dim) [--pti--> tuned generator].
"""
