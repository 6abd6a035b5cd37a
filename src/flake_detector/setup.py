from setuptools import find_packages, setup

package_name = 'flake_detector'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    package_data={package_name: ['models/*.pt', 'models/*.json',
                                'defects/models/*.pt', 'defects/models/*.json']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
    ],
    install_requires=['setuptools'],
    zip_safe=False,
    maintainer='Flake scanner maintainers',
    maintainer_email='maintainers@flake-scanner.invalid',
    description='Flake detection (candidates, optical contrast, cascade CNNs, Mask R-CNN), '
                'evaluation, and the STEM point-defect analyzer.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'flake-detect = flake_detector.cli:main',
            'flake-eval = flake_detector.evaluation_cli:main',
            'flake-calibrate = flake_detector.calibrate:main',
            'flake-train-cascade = flake_detector.cascade_train:main',
            'flake-finetune = flake_detector.finetune:main',
            'flake-train-maskrcnn = flake_detector.maskrcnn.train:main',
            'flake-defects = flake_detector.defects.cli:main',
            'flake-bag-eval = flake_detector.bag_evaluate:main',
            'detector_node = flake_detector.nodes.detector_node:main',
            'defect_analyzer_node = flake_detector.nodes.defect_analyzer_node:main',
        ],
    },
)
