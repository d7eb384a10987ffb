# The headroom table of each round: on the test images (ground truth), the PSNR of the teacher's plain
# output and of every pseudo-label it makes, as the label stage makes them (evaluate.headroom).


rule headroom:
    input:
        teacher=teacher_of,
        test=str(L.degraded("test")),
        reward=reward_of_round,  # the learned member, when the ensemble has it
        leaks=ancient(str(L.leak_report)),  # the leak check passed (see data.smk)
    output:
        str(L.headroom("{r}")),
    params:
        cfg=slice_json("iqa", "label"),
        test=str(L.prepared("test")),
    log:
        str(L.log("round_{r}/headroom")),
    threads: 1
    resources:
        gpu=1,
    script:
        "../scripts/headroom.py"
