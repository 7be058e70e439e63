"""Facts about the BEHAVIOR-1K 2025 challenge data and robot (R1Pro) that every module shares.

Sources are cited in ../shared/reference/behavior_data_and_protocol.md (sections in brackets below) and
pi_behavior.md. Nothing here is configurable: these are properties of the dataset and the evaluator.
"""

from __future__ import annotations

import numpy as np

# --- Tasks [§2] -------------------------------------------------------------------------------------------

TASK_NAMES: tuple[str, ...] = (
    "turning_on_radio", "picking_up_trash", "putting_away_Halloween_decorations", "cleaning_up_plates_and_food",
    "can_meat", "setting_mousetraps", "hiding_Easter_eggs", "picking_up_toys", "rearranging_kitchen_furniture",
    "putting_up_Christmas_decorations_inside", "set_up_a_coffee_station_in_your_kitchen",
    "putting_dishes_away_after_cleaning", "preparing_lunch_box", "loading_the_car", "carrying_in_groceries",
    "bringing_in_wood", "moving_boxes_to_storage", "bringing_water", "tidying_bedroom", "outfit_a_basic_toolbox",
    "sorting_vegetables", "collecting_childrens_toys", "putting_shoes_on_rack", "boxing_books_up_for_storage",
    "storing_food", "clearing_food_from_table_into_fridge", "assembling_gift_baskets", "sorting_household_items",
    "getting_organized_for_work", "clean_up_your_desk", "setting_the_fire", "clean_boxing_gloves",
    "wash_a_baseball_cap", "wash_dog_toys", "hanging_pictures", "attach_a_camera_to_a_tripod", "clean_a_patio",
    "clean_a_trumpet", "spraying_for_bugs", "spraying_fruit_trees", "make_microwave_popcorn", "cook_cabbage",
    "chop_an_onion", "slicing_vegetables", "chopping_wood", "cook_hot_dogs", "cook_bacon", "freeze_pies",
    "canning_food", "make_pizza",
)
NUM_TASKS = len(TASK_NAMES)

# Natural-language instruction per task (docs/challenge/task_data.json `instruction`); tasks.jsonl `task` field.
# The real 2025 tasks.jsonl may carry small wording differences (e.g. a typo in task 1); readers use the
# dataset's own tasks.jsonl, this table is for synthesis and for serving without a dataset.
TASK_INSTRUCTIONS: tuple[str, ...] = (
    "Turn on the radio receiver that's on the table in the living room.",  # 0
    'Put the three cans of soda from the living room inside the trash can in the kitchen.',  # 1
    'Place each of the two pumpkins and all three candles from the living room inside a cabinet in the living room (use any cabinet), then make sure every cabinet is closed, and position the cauldron so it is next to a table in the living room.',  # 2
    'From the breakfast table in the kitchen, move both pizzas - keeping each on its plate - into the same refrigerator, put both bowls into one sink, and make sure the refrigerator is closed.',  # 3
    'Open the kitchen cabinet, take out the two hinged jars, open them, place exactly two cooked bratwursts from the chopping board on the countertop into each jar, then close both jars, put them back inside the cabinet, and close the cabinet.',  # 4
    'Take the four mousetraps from the cabinet in the bathroom and place them on the bathroom floor. Make sure all four end up on the same floor surface, and ensure that at least two of them are either under or directly next to the same bathroom sink.',  # 5
    'Take the three Easter eggs out of the wicker basket on the lawn in the garden, then place them on the lawn next to a single tree (choose any tree) so that all three eggs are next to the same tree and none are left in the basket.',  # 6
    "Put all the toys in the child's room - the three board games (two on the bed and one on the table), the two jigsaw puzzles on the table, and the tennis ball on the table - inside the toy box on the table in the child's room.",  # 7
    'Move the toaster, food processor, and French press from the kitchen countertop into the same kitchen cabinet, and make sure that cabinet is closed at the end.',  # 8
    'In the living room, take the wreath, three candy canes, and two pillar candles out of the wicker basket. Place the wreath and two of the candy canes on the same living-room sofa. Put the remaining candy cane on top of a dining-room table. Put both pillar candles together on top of one dining-room table (they can share the same table). Finally, place all three gift boxes under or right next to the Christmas tree in the living room.',  # 9
    'Set up a coffee station on the kitchen countertop: keep the coffee maker on the countertop, move the bottle of coffee from the kitchen shelf to the counter next to the coffee maker, place a paper coffee filter on top of the coffee maker, put the saucer next to the coffee maker with the coffee cup on the saucer, and place the electric kettle next to the coffee maker.',  # 10
    "In the kitchen, gather all eight plates from the two countertops, place them all inside a single cabinet (either one), and make sure all cabinets are closed when you're done.",  # 11
    "Put both apple halves, the club sandwich, and the chocolate chip cookie from the chopping board on the kitchen countertop into the packing box on the countertop. Then take the bottle of tea out of the refrigerator, put it into the same box, and close the refrigerator when you're done.",  # 12
    'Put the digital camera from the living room table into the container on the living room floor. Then take the container and the tennis racket to the garage, place both in the car trunk, and close it.',  # 13
    "Take the sack of groceries out of the car trunk in the garage, bring it to the kitchen, and put both the tomato and the carton of milk into the refrigerator in the kitchen. When you're done, close the car trunk and make sure the refrigerator in the kitchen is closed.",  # 14
    'Bring the three plywood sheets from the garden into the corridor and place them on the floor there.',  # 15
    'Move the two storage containers from the living room to the garage. In the garage, place one container on the floor and stack the other container on top of it (either order is fine).',  # 16
    'Retrieve the two bottles from the refrigerator in the kitchen, bring them to the living room, and place both on the coffee table. Make sure the refrigerator is closed when you finish.',  # 17
    'In the bedroom, move the book from the bed onto either nightstand, and place the two sandals side by side next to the bed.',  # 18
    'In the utility room, put the drill, pliers, flashlight, Allen wrench, and screwdriver from the tabletop into the toolbox, keep the toolbox on the tabletop, and close the toolbox.',  # 19
    'Sort the vegetables from the two wicker baskets on the kitchen floor into the mixing bowls on the kitchen countertop: put all three bok choy and all three Vidalia onions together into one mixing bowl; put both leeks and both broccoli together into a second mixing bowl; and put all three sweet corn into a third mixing bowl.',  # 20
    "Pick up the two dice from the bed, the two teddy bears from the floor, and the two board games (one from the desk and one from the bed), and place them all inside the same bookcase in the child's room.",  # 21
    'Pick up the two gym shoes and the two sandals from the corridor floor and place them onto the hallstand (shoe rack) in the corridor, making sure they are on the rack and not on the floor. Arrange them so the two gym shoes are next to each other and the two sandals are next to each other.',  # 22
    'Put all six books from the bookcases in the living room into the box on the living room floor.',  # 23
    'Put away all the food on the kitchen countertop by storing it inside the kitchen cabinets: move the two boxes of oatmeal, two bags of chips, two bottles of olive oil, and two jars of sugar from the countertop into the kitchen cabinets (each item can go into either cabinet).',  # 24
    'Pack the half chicken and the half apple pie from the plates on the breakfast table into the two tupperware containers from the countertop, then put both tupperware containers inside the refrigerator in the kitchen and make sure the refrigerator is closed at the end.',  # 25
    'Place one candle, one butter cookie, one piece of Swiss cheese, and one bow from the table into each of the four wicker baskets on the floor in the living room.',  # 26
    'From the two baskets on the bedroom floor, take out the items and organize them in the bathroom: place both detergent bottles under the bathroom sink next to each other; put the box of sanitary napkins on the bathroom shelf; set the soap dispenser on the sink; make sure the cup remains on the sink; put both the toothpaste tube and the toothbrush inside the cup.',  # 27
    'In the bedroom, organize the workspace by keeping the computer under the desk, ensuring the monitor is on the desk, placing the keyboard on the desk next to the monitor, placing the mouse on the desk next to the keyboard, moving the folder from the swivel chair onto the desk next to the mouse, stacking the notebook on top of the folder with the pen on top of the notebook, and positioning the swivel chair next to the desk.',  # 28
    "In the child's room, clean up the desk: put both folders and both paperback books into the bookcase; put the pencil and both pens into the pencil case and leave the case on the desk; take the stapler out of the bookcase and place it on the desk; move the laptop from the bed onto the desk and close it.",  # 29
    'In the living room, place the newspaper from the table into the wood fireplace, then put both pieces of firewood from the floor on top of the newspaper. Use the cigar lighter to ignite any one of the items so that the whole pile catches fire, and then turn the lighter off.',  # 30
    'Wash the two dusty boxing gloves from the countertop in the utility room in the washer until they are no longer covered with dust.',  # 31
    'Wash the two baseball caps on the countertop in the utility room using the washer until they are no longer dirty.',  # 32
    'In the utility room, take the two teddy toys, the tennis ball, and the softball out of the cabinet and wash them in the washer so that both teddies are free of dirt and dust, the tennis ball has no debris, and the softball has no dirt.',  # 33
    'Pick up the poster from the kitchen countertop and hang it on one of the wall nails in the kitchen.',  # 34
    'Attach the digital camera to the camera tripod in the bedroom.',  # 35
    'Pick up the broom in the garden and sweep the mud off the patio floor until the floor is no longer covered in mud.',  # 36
    "In the bedroom, pick up the scrub brush from the desk and scrub the cornet (trumpet) on the desk until it's no longer covered in dust.",  # 37
    'Pick up the pesticide atomizer in the garden and spray insectifuge to fully cover both potted plants in the garden.',  # 38
    'In the garden, pick up the pesticide atomizer on the floor and spray pesticide onto both trees until each tree trunk is fully covered.',  # 39
    'In the kitchen, take the popcorn bag from the countertop, put it into the microwave, and heat it until the popcorn is cooked so the cooked popcorn ends up inside the bag.',  # 40
    'From the kitchen refrigerator, take the cabbage and the chili, dice them on the chopping board with the knife, cook the diced cabbage and diced chili in the frying pan on the stove, and leave the cooked, diced cabbage and cooked, diced chili in the frying pan.',  # 41
    'In the kitchen, take the Vidalia onion out of the sink, dice it on the chopping board with the paring knife, put the diced onion into the bowl on the countertop, then place both the paring knife and the chopping board into the sink.',  # 42
    'From the refrigerator in the kitchen, take out the two bell peppers, the two beets, and the zucchini. Then, on either chopping board on the countertop, use the parer to dice all of them so that only diced bell pepper, diced beet, and diced zucchini remain. Make sure the refrigerator is closed when you finish.',  # 43
    'Chop the four logs on the driveway in the garden into eight half logs using the axe and the chopping block.',  # 44
    'Take the two hot dogs out of the refrigerator in the kitchen and cook them in the microwave until both are cooked.',  # 45
    "Take the tray with six slices of bacon out of the refrigerator in the kitchen, cook all six slices in the frying pan on the stove until they're cooked, and make sure the refrigerator is closed when you're done.",  # 46
    'In the kitchen, take the two apple pies from the plates on the countertop, put each pie into a separate tupperware container taken from the cabinet, place both tupperwares inside the refrigerator, close the refrigerator, and leave them until the pies are frozen.',  # 47
    'In the kitchen, open the refrigerator and the cabinet. Take the steak and the pineapple out of the refrigerator and take two bowls from the cabinet. On the chopping board on the countertop, use the carving knife to dice the steak and to dice the pineapple. Put only the diced steak into one bowl and only the diced pineapple into the other bowl - do not mix them. Place both bowls back inside the cabinet, then close the refrigerator and close the cabinet.',  # 48
    "Make a pizza on the cookie sheet in the kitchen: take the grated cheese, the four pieces of pepperoni, and the two mushrooms from their tupperware containers in the refrigerator; chop the Vidalia onion on the chopping board with the knife, and also chop the two whole mushrooms in half; top the pizza dough that's already on the cookie sheet with the cheese, pepperoni, halved mushrooms, and chopped onion; bake it in the oven until it becomes a pizza, and leave the finished pizza on the cookie sheet.",  # 49
)
assert len(TASK_INSTRUCTIONS) == NUM_TASKS

# Mean human demo duration in seconds per task (task_data.json `duration`).
TASK_DURATION_S: tuple[int, ...] = (
    72, 176, 460, 457, 395, 339, 254, 630, 298, 457, 209, 365, 275, 641, 476, 451, 487, 315, 368, 355,
    397, 640, 258, 808, 662, 436, 869, 527, 522, 714, 304, 275, 278, 374, 80, 130, 402, 177, 216, 278,
    108, 471, 213, 495, 358, 305, 256, 415, 766, 640,
)

# Per-task number of time-based stages of the 1st-place solution (pi_behavior §1.3, §2.5).
TASK_NUM_STAGES: tuple[int, ...] = (
    5, 6, 15, 15, 14, 12, 9, 15, 10, 15, 7, 13, 10, 15, 15, 15, 15, 11, 13, 12,
    14, 15, 9, 15, 15, 15, 15, 15, 15, 15, 11, 10, 10, 13, 5, 5, 14, 6, 8, 10,
    5, 15, 8, 15, 12, 11, 9, 14, 15, 15,
)
MAX_NUM_STAGES = max(TASK_NUM_STAGES)

# Episode index scheme [§1.4]: task*10000 + instance*10 + traj.
EPISODES_PER_CHUNK = 10000


def episode_index(task_id: int, instance_id: int, traj_id: int = 0) -> int:
    """The dataset's episode index for (task, instance, trajectory)."""
    if not (0 <= task_id < NUM_TASKS and 0 <= instance_id < 1000 and 0 <= traj_id < 10):
        raise ValueError(f"bad episode coordinates task={task_id} instance={instance_id} traj={traj_id}")
    return task_id * EPISODES_PER_CHUNK + instance_id * 10 + traj_id


def task_of_episode(ep: int) -> int:
    return ep // EPISODES_PER_CHUNK


def stage_label(frame: int | np.ndarray, episode_length: int, task_id: int) -> int | np.ndarray:
    """Time-based stage: clip(floor(frame / (T / n)), 0, n-1) with n = TASK_NUM_STAGES[task] (pi_behavior §2.5)."""
    n = TASK_NUM_STAGES[task_id]
    stage = np.floor(np.asarray(frame, dtype=np.float64) / (episode_length / n)).astype(np.int64)
    stage = np.clip(stage, 0, n - 1)
    return int(stage) if np.ndim(stage) == 0 else stage


# --- Skills [§1.10]: (id, phrase, type) with N=navigation, U=uncoordinated, C=coordinated -------------------

SKILLS: tuple[tuple[int, str, str], ...] = (
    (1, "move to", "navigation"), (2, "pick up from", "uncoordinated"), (3, "place on", "uncoordinated"),
    (4, "place in", "uncoordinated"), (5, "hand over", "coordinated"), (6, "insert", "coordinated"),
    (8, "release", "uncoordinated"), (9, "open drawer", "uncoordinated"), (10, "open door", "coordinated"),
    (11, "close drawer", "uncoordinated"), (12, "close door", "coordinated"), (13, "open lid", "coordinated"),
    (14, "close lid", "coordinated"), (19, "attach", "coordinated"), (28, "pour", "coordinated"),
    (34, "chop", "coordinated"), (46, "wipe hard", "coordinated"), (50, "sweep surface", "coordinated"),
    (61, "hang", "coordinated"), (67, "press", "coordinated"), (69, "turn on switch", "coordinated"),
    (70, "turn off switch", "coordinated"), (88, "ignite", "coordinated"), (90, "push to", "uncoordinated"),
    (91, "place on next to", "uncoordinated"), (92, "place in next to", "uncoordinated"),
    (93, "turn to", "uncoordinated"), (94, "hold", "uncoordinated"), (95, "spray", "coordinated"),
    (98, "place under", "uncoordinated"), (99, "tip over", "uncoordinated"),
)
SKILL_IDS: tuple[int, ...] = tuple(s[0] for s in SKILLS)
SKILL_PHRASES: dict[int, str] = {s[0]: s[1] for s in SKILLS}
# Dense class index of each annotation skill id (what classifiers and prompt tables index by).
SKILL_INDEX: dict[int, int] = {sid: i for i, sid in enumerate(SKILL_IDS)}
NUM_SKILLS = len(SKILLS)

# --- Proprioception (256-d `observation.state` = evaluator `robot_r1::proprio`) [§1.6] ----------------------

PROPRIO_DIM = 256
PROPRIO: dict[str, slice] = {
    "joint_qpos": slice(0, 28), "joint_qpos_sin": slice(28, 56), "joint_qpos_cos": slice(56, 84),
    "joint_qvel": slice(84, 112), "joint_qeffort": slice(112, 140), "robot_pos": slice(140, 143),
    "robot_ori_cos": slice(143, 146), "robot_ori_sin": slice(146, 149), "robot_2d_ori": slice(149, 150),
    "robot_2d_ori_cos": slice(150, 151), "robot_2d_ori_sin": slice(151, 152), "robot_lin_vel": slice(152, 155),
    "robot_ang_vel": slice(155, 158), "arm_left_qpos": slice(158, 165), "arm_left_qpos_sin": slice(165, 172),
    "arm_left_qpos_cos": slice(172, 179), "arm_left_qvel": slice(179, 186), "eef_left_pos": slice(186, 189),
    "eef_left_quat": slice(189, 193), "gripper_left_qpos": slice(193, 195), "gripper_left_qvel": slice(195, 197),
    "arm_right_qpos": slice(197, 204), "arm_right_qpos_sin": slice(204, 211), "arm_right_qpos_cos": slice(211, 218),
    "arm_right_qvel": slice(218, 225), "eef_right_pos": slice(225, 228), "eef_right_quat": slice(228, 232),
    "gripper_right_qpos": slice(232, 234), "gripper_right_qvel": slice(234, 236), "trunk_qpos": slice(236, 240),
    "trunk_qvel": slice(240, 244), "base_qpos": slice(244, 247), "base_qpos_sin": slice(247, 250),
    "base_qpos_cos": slice(250, 253), "base_qvel": slice(253, 256),
}
# Order of the 28 joints inside joint_qpos: 0:6 virtual base, 6:10 torso, 10:24 arms interleaved
# (left 10,12,..,22; right 11,13,..,23), 24:26 left fingers, 26:28 right fingers.
JOINT_TORSO = tuple(range(6, 10))
JOINT_LEFT_ARM = tuple(range(10, 24, 2))
JOINT_RIGHT_ARM = tuple(range(11, 24, 2))
JOINT_LEFT_FINGERS = (24, 25)
JOINT_RIGHT_FINGERS = (26, 27)
GRIPPER_MAX_WIDTH = 0.1  # two fingers, each 0..0.05 m

# --- Action (23-d) [§1.7] and policy state [§3] -----------------------------------------------------------

ACTION_DIM = 23
STATE_DIM = 23
MODEL_DIM = 32  # actions and state are zero-padded to 32 for the model
ACTION_HORIZON = 30  # future actions per sample, 30 Hz
FPS = 30
ACTION_GROUPS: dict[str, slice] = {
    "base": slice(0, 3), "torso": slice(3, 7), "left_arm": slice(7, 14), "left_gripper": slice(14, 15),
    "right_arm": slice(15, 22), "right_gripper": slice(22, 23),
}
# Dims predicted as deltas w.r.t. the current state (make_bool_mask(-3, 3, -1, 7, -1, 7, -1)): torso 3:6 and arms.
DELTA_ACTION_MASK: np.ndarray = np.zeros(ACTION_DIM, dtype=bool)
DELTA_ACTION_MASK[3:6] = True
DELTA_ACTION_MASK[7:14] = True
DELTA_ACTION_MASK[15:22] = True
DELTA_ACTION_MASK.setflags(write=False)

JOINT_RANGE_LOW = np.array(
    [-0.75, -0.75, -1.0, -1.1345, -2.7925, -1.8326, -3.0543,
     -4.4506, -0.1745, -2.3562, -2.0944, -2.3562, -1.0472, -1.5708, -1.0,
     -4.4506, -3.1416, -2.3562, -2.0944, -2.3562, -1.0472, -1.5708, -1.0], dtype=np.float32)
JOINT_RANGE_HIGH = np.array(
    [0.75, 0.75, 1.0, 1.8326, 2.5307, 1.5708, 3.0543,
     1.3090, 3.1416, 2.3562, 0.3491, 2.3562, 1.0472, 1.5708, 1.0,
     1.3090, 0.1745, 2.3562, 0.3491, 2.3562, 1.0472, 1.5708, 1.0], dtype=np.float32)


def gripper_width_to_action_scale(width: np.ndarray) -> np.ndarray:
    """Map summed finger opening (0..0.1 m) to the gripper action scale [-1, 1] (-1 closed, +1 open)."""
    return 2.0 * width / GRIPPER_MAX_WIDTH - 1.0


def proprio_to_state(proprio: np.ndarray) -> np.ndarray:
    """Extract the 23-d policy state from 256-d proprio, in action order (pi_behavior §2.1).

    [base_qvel(3), trunk_qpos(4), left arm(7), left gripper(1), right arm(7), right gripper(1)], gripper width
    mapped to [-1, 1]. Works on (..., 256) arrays and returns float32 (..., 23).
    """
    p = np.asarray(proprio, dtype=np.float32)
    if p.shape[-1] != PROPRIO_DIM:
        raise ValueError(f"proprio must have {PROPRIO_DIM} values in its last dim, got shape {p.shape}")
    left_w = p[..., PROPRIO["gripper_left_qpos"]].sum(-1, keepdims=True)
    right_w = p[..., PROPRIO["gripper_right_qpos"]].sum(-1, keepdims=True)
    return np.concatenate([
        p[..., PROPRIO["base_qvel"]], p[..., PROPRIO["trunk_qpos"]], p[..., PROPRIO["arm_left_qpos"]],
        gripper_width_to_action_scale(left_w), p[..., PROPRIO["arm_right_qpos"]],
        gripper_width_to_action_scale(right_w),
    ], axis=-1).astype(np.float32)


# --- Cameras and videos [§1.2, §1.9, §4.4] ----------------------------------------------------------------

CAMERAS: tuple[str, ...] = ("head", "left_wrist", "right_wrist")  # model image order (pi_behavior §1.2)
INFO_CAMERA_ORDER: tuple[str, ...] = ("left_wrist", "right_wrist", "head")  # info.json feature order
MODALITIES: tuple[str, ...] = ("rgb", "depth", "seg_instance_id")
FULL_RESOLUTION: dict[str, int] = {"head": 720, "left_wrist": 480, "right_wrist": 480}
MODEL_IMAGE_SIZE = 224
EVAL_CAMERA_KEYS: dict[str, str] = {
    "head": "robot_r1::robot_r1:zed_link:Camera:0::rgb",
    "left_wrist": "robot_r1::robot_r1:left_realsense_link:Camera:0::rgb",
    "right_wrist": "robot_r1::robot_r1:right_realsense_link:Camera:0::rgb",
}


def video_key(modality: str, camera: str) -> str:
    return f"observation.images.{modality}.{camera}"


RGB_VIDEO_KEYS: dict[str, str] = {cam: video_key("rgb", cam) for cam in CAMERAS}

# Depth quantisation used by the dataset's depth videos [§1.9].
DEPTH_MIN_M, DEPTH_MAX_M, DEPTH_SHIFT_M = 0.0, 10.0, 3.5
DEPTH_QMAX = 16383


def quantize_depth(depth_m: np.ndarray) -> np.ndarray:
    """Metres -> uint16 log-scaled code as stored in the depth videos."""
    lo, hi = np.log(DEPTH_SHIFT_M), np.log(DEPTH_MAX_M + DEPTH_SHIFT_M)
    q = (np.log(np.asarray(depth_m, np.float64) + DEPTH_SHIFT_M) - lo) / (hi - lo) * DEPTH_QMAX
    return np.round(np.clip(q, 0, DEPTH_QMAX)).astype(np.uint16)


def dequantize_depth(q: np.ndarray) -> np.ndarray:
    lo, hi = np.log(DEPTH_SHIFT_M), np.log(DEPTH_MAX_M + DEPTH_SHIFT_M)
    return (np.exp(np.asarray(q, np.float64) / DEPTH_QMAX * (hi - lo) + lo) - DEPTH_SHIFT_M).astype(np.float32)
